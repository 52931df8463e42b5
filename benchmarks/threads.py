"""``python -m benchmarks.threads [--repeats R]``: the default threads on a quiet and a busy CPU.

Wanda prunes SmolLM2-135M (8 x 128 calibration windows) in fresh processes under three settings:

- ``torch default``: torch's default threads (one per core), as gblm ran before;
- ``gblm default``: the CPUs idle at the start (:func:`gblm.devices.default_threads`);
- ``one thread``: ``torch.set_num_threads(1)``.

Each runs on the machine as it is (``quiet``) and beside one CPU-bound process (``busy``:
``python -c 'while True: pass'``). Seconds: the pipeline's ``prune`` stage (the layer walk).
The targets: on a busy machine the default is never slower than one thread; on a quiet one no
slower than torch's default (within 5%). The load average before each condition is printed: a "quiet"
machine that others load is not quiet.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import Config, machine, measure
from benchmarks.run import SMOLLM2, table, write_report
from gblm.paths import PROJECT_ROOT
from gblm.pipeline import PRUNE

OPENMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
SETTINGS: dict[str, tuple[dict[str, str], int | None]] = {  # extra environment, threads
    "torch default": ({}, 0),
    "gblm default": ({}, None),
    "one thread": ({}, 1),
}
CONDITIONS = ("quiet", "busy")
TOLERANCE = 1.05


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without any OpenMP wait setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARS}
    return {**env, **extra}


def measure_all(config: Config, repeats: int) -> dict[str, Any]:
    """``{condition: {"load_average": ..., "seconds": {setting: [s, ...]}}}``."""
    found: dict[str, Any] = {}
    for condition in CONDITIONS:
        spinner = None
        if condition == "busy":
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1)
        try:
            entry = {"load_average": [round(x, 2) for x in os.getloadavg()], "seconds": {}}
            for name, (extra, threads) in SETTINGS.items():
                config_t = Config(**{**config.__dict__, "threads": threads})
                for _ in range(repeats):
                    print(f"threads: {condition}, {name} ...", file=sys.stderr, flush=True)
                    result = measure(config_t, env=child_env(extra))
                    entry["seconds"].setdefault(name, []).append(result["seconds"][PRUNE])
                    entry.setdefault("threads", {})[name] = result["machine"]["threads"]
            found[condition] = entry
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    return found


def verdicts(found: dict[str, Any]) -> list[dict[str, Any]]:
    """Busy: the default within 5% of one thread (or faster); quiet: within 5% of torch's default."""
    best = {c: {n: min(s) for n, s in found[c]["seconds"].items()} for c in found}
    rows = []
    for condition, baseline in (("busy", "one thread"), ("quiet", "torch default")):
        if condition in best:
            ratio = best[condition]["gblm default"] / best[condition][baseline]
            rows.append({"target": f"{condition}: gblm default / {baseline}", "ratio": ratio,
                         "limit": TOLERANCE, "met": ratio <= TOLERANCE})  # fmt: skip
    return rows


def render(report: dict[str, Any]) -> str:
    m, found = report["machine"], report["conditions"]
    rows = [[c, str(found[c]["load_average"]), name,
             str(found[c].get("threads", {}).get(name) or "-"),
             ", ".join(f"{s:.1f}" for s in seconds)]
            for c in found for name, seconds in found[c]["seconds"].items()]  # fmt: skip
    checks = [[v["target"], f"{v['ratio']:.2f}x", f"{v['limit']}x", "MET" if v["met"] else
               "missed"] for v in report["verdicts"]]  # fmt: skip
    lines = [
        f"# Threads on a quiet and a busy CPU: Wanda, SmolLM2, {report['nsamples']} x "
        f"{report['seqlen']}",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; {report['seconds']:.0f} s in all. "
        "Seconds of the layer walk (the pipeline's `prune` stage), one fresh process each.",
        "",
        *table(["condition", "load average before", "setting", "threads", "seconds"], rows),
        *table(["target", "ratio", "limit", "verdict"], checks),
    ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__)
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting and condition")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench"))
    args = parser.parse_args(argv)
    config = Config(model=SMOLLM2, method="wanda", nsamples=args.nsamples, seqlen=args.seqlen)
    began = time.perf_counter()
    found = measure_all(config, args.repeats)
    report = {"machine": machine(), "nsamples": args.nsamples, "seqlen": args.seqlen,
              "conditions": found, "verdicts": verdicts(found),
              "seconds": time.perf_counter() - began}  # fmt: skip
    text = render(report)
    path = write_report("threads-", report, text, Path(args.out))
    print(text)
    print(f"written: {path} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
