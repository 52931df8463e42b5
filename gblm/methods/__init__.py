"""Pruning methods as plug-ins: one class, one ``conf/method/<name>.yaml``, one test file."""
