"""What a pruning run did to the model, measured and reported: mask statistics (:mod:`.stats`,
pure tensor math), their records in a run folder (:mod:`.records`), mask images (:mod:`.plots`)
and the sweep report (:mod:`.report`). It reads no model and runs no calibration."""
