"""What a run keeps besides metrics.json: lm-eval's own output and the task it ran."""

from __future__ import annotations

import json

from gblm.run import run
from tests.conftest import compose_config


def test_zeroshot_results_samples_and_task_are_kept_in_the_run_dir(tmp_path):
    cfg = compose_config(
        "model=tiny_llama", "method=magnitude", "eval.perplexity.enabled=false",
        "eval.zeroshot.enabled=true", "eval.zeroshot.limit=4", "eval.zeroshot.cloze_items=20",
        "eval.zeroshot.log_samples=true", "progress=false", "mask_images=[]",
    )  # fmt: skip
    metrics = run(cfg, run_dir=tmp_path)
    row = metrics["zeroshot"]["austen_cloze"]
    assert row["samples"] == 4 and {"acc_stderr", "acc_norm_stderr"} <= set(row)
    kept = json.loads((tmp_path / "lm_eval_results.json").read_text())
    assert kept["results"]["austen_cloze"]["acc,none"] == row["acc"]
    assert len((tmp_path / "lm_eval_samples_austen_cloze.jsonl").read_text().splitlines()) == 4
    task = tmp_path / "lm_eval_tasks"
    assert (task / "austen_cloze.yaml").exists() and (task / "austen_cloze.jsonl").exists()
    assert str(task / "austen_cloze.jsonl") in (task / "austen_cloze.yaml").read_text()
