"""``python -m benchmarks.run [--quick] [--no-smollm2]``: run the benchmarks, print and save the report.

The report goes to stdout and to ``outputs/bench/<timestamp>.json`` and ``.md``. Progress lines go
to stderr. Targets are judged in the printed verdicts, never by an exit code: a missed target is a
finding, not a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.cases import Settings, preset
from benchmarks.render import render
from benchmarks.suite import run_suite
from gblm.paths import PROJECT_ROOT
from gblm.utils import atomic_write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Time, memory and ratio to floor of every method and stage of gblm.",
    )
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="small models, ~1-2 minutes")
    speed.add_argument("--smoke", action="store_true", help="tiny models, seconds (tests)")
    parser.add_argument(
        "--smollm2",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the pretrained SmolLM2-135M too (default: yes in the default mode, ~6 more minutes)",
    )
    parser.add_argument(
        "--cases", default=None, help="only these models, comma-separated (e.g. llama_h128_l4)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    parser.add_argument("--repeats", type=int, default=None, help="override the preset's repeats")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration windows N")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per window T")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    parser.add_argument(
        "--out",
        type=Path,
        default=PROJECT_ROOT / "outputs" / "bench",
        help="where <timestamp>.json and .md go (default outputs/bench)",
    )
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    mode = "quick" if args.quick else "smoke" if args.smoke else "default"
    smollm2 = args.smollm2 if args.smollm2 is not None else mode == "default"
    settings = preset(mode, smollm2=smollm2, threads=args.threads)
    overrides: dict[str, Any] = {}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.nsamples is not None:
        overrides["nsamples"] = args.nsamples
    if args.seqlen is not None:
        overrides["seqlen"] = args.seqlen
    if args.no_memory:
        overrides["memory"] = False
    if args.cases:
        wanted = args.cases.split(",")
        known = {case.name: case for case in settings.cases}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise SystemExit(
                f"--cases {args.cases}: unknown {', '.join(unknown)}; this mode has "
                f"{', '.join(known)}."
            )
        overrides["cases"] = tuple(known[name] for name in wanted)
        if settings.probe not in wanted:
            overrides["probe"] = None
    return replace(settings, **overrides)


def write_report(report: dict[str, Any], text: str, out_dir: Path) -> tuple[Path, Path]:
    """``<out_dir>/<timestamp>.json`` and ``.md``, each written atomically."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, md_path = out_dir / f"{stamp}.json", out_dir / f"{stamp}.md"
    atomic_write_text(json_path, json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(md_path, text)
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    report = run_suite(settings, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    text = render(report)
    json_path, md_path = write_report(report, text, args.out)
    print(text)
    print(f"written: {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
