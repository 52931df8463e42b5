"""Onloading from disk-backed weights against the in-memory run (``make bench-onload``).

A random-init LLaMA-shaped model (fp32, the CPU's compute dtype) is written once as sharded
safetensors under ``outputs/bench_onload/<config hash>/`` (one shard per block, so writing it
never holds more than a block). Each depth's model is then pruned with Wanda and with GBLM (l1,
fp16 accumulators), each case in a fresh process through the pipeline
(:func:`benchmarks.measure.measure`):

- ``memory``: the model loaded and copied into ordinary (anonymous) memory, as a model that fits;
  GBLM's full-model gradient stage.
- ``disk``: the memory-mapped checkpoint with ``model.onload=true``: block by block, the gradient
  stage too, the pruned blocks and the accumulators in file-backed mappings.

Reported per case: the time of the method's passes and the walk (loading excluded) as the
pipeline's stage timer gave them, the peak anonymous memory above the process's own after its imports (``RssAnon`` of ``/proc/self/status``,
sampled every 10 ms), and a digest of the masks (the two modes must agree). The floor of the disk
case: the largest block, embeddings and head, the kept activations (two (N, T, H) buffers), and
for GBLM one block's fp16 accumulators. Targets: peak within 1.3x the floor, time within 1.5x
the in-memory run's.

    python -m benchmarks.onload                 # depths 8 and 28 (28: 1.55 B parameters)
    python -m benchmarks.onload --smoke         # a tiny shape in this process, seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

TARGETS = {"peak_over_floor": 1.3, "time_disk_over_memory": 1.5}
FULL = {"hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16,
        "vocab_size": 32000, "depths": [8, 28], "windows": 4, "seqlen": 128}  # fmt: skip
SMOKE = {"hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4,
         "vocab_size": 256, "depths": [2, 4], "windows": 2, "seqlen": 16}  # fmt: skip
METHODS = ("wanda", "gblm")
MODES = ("memory", "disk")


def llama_config(shape: dict, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_attention_heads=shape["num_attention_heads"], num_hidden_layers=layers,
        num_key_value_heads=shape["num_attention_heads"], vocab_size=shape["vocab_size"],
        max_position_embeddings=max(2048, shape["seqlen"]), tie_word_embeddings=False,
        dtype="float32",
    )  # fmt: skip


def _value(name: str, shape, seed: int):
    """A tensor's random-init value, seeded by its name: norms 1, the rest N(0, 0.02)."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape)
    digest = int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(digest)).mul_(0.02)


def write_checkpoint(shape: dict, layers: int, cache: Path) -> Path:
    """The checkpoint folder for ``layers`` blocks, written once (one shard per block, the rest
    in the last); keyed by the config's content."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from gblm.utils import atomic_write, content_hash

    config = llama_config(shape, layers)
    folder = (
        cache / f"llama_{layers}x{shape['hidden_size']}_{content_hash(config.to_dict(), length=12)}"
    )
    if (folder / "model.safetensors.index.json").exists():
        return folder
    with torch.device("meta"):
        names = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    shard_of = {k: int(k.split(".")[2]) if k.startswith("model.layers.") else layers for k in names}

    def fill(tmp: Path) -> None:
        config.save_pretrained(tmp)
        weight_map = {}
        for shard in range(layers + 1):
            file = f"model-{shard + 1:05d}-of-{layers + 1:05d}.safetensors"
            keys = [k for k in names if shard_of[k] == shard]
            save_file({k: _value(k, names[k], 0) for k in keys}, str(tmp / file))
            weight_map.update(dict.fromkeys(keys, file))
        index = {"metadata": {}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))

    folder.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(folder, fill, directory=True)
    return folder


def floor_bytes(shape: dict, layers: int, method: str) -> dict:
    """The disk case's floor: largest block, embeddings + head, kept activations, (GBLM) one
    block's fp16 accumulators; fp32 weights."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    block = 4 * h * h + 3 * h * i + 2 * h  # parameters
    parts = {
        "block": 4 * block,
        "embeddings_head": 4 * 2 * v * h,
        "activations": 2 * 4 * shape["windows"] * shape["seqlen"] * h,
        "accumulators": 2 * (4 * h * h + 3 * h * i) if method == "gblm" else 0,
    }
    parts["total"] = sum(parts.values())
    parts["parameters"] = layers * block + 2 * v * h + h
    return parts


def run_case(checkpoint: Path, method: str, mode: str, shape: dict, fresh: bool = True) -> dict:
    """One case in a fresh process (:func:`benchmarks.measure.measure`; ``fresh=False``: in this
    one, for the smoke test): the seconds of the method's dense pass and the walk as the
    pipeline's timer gave them, the peak anonymous memory above the process's own after its
    imports, the masks' digest."""
    from benchmarks.measure import Config, measure

    config = Config(
        model={"checkpoint": str(checkpoint), "private": mode == "memory"}, method=method,
        nsamples=shape["windows"], seqlen=shape["seqlen"], onload=mode == "disk",
        sample_anon=True,
    )  # fmt: skip
    result = measure(config, fresh=fresh)
    return {"seconds": sum(result["seconds"].values()), "stages": result["seconds"],
            "peak_anon": max(0, result["peak_anon_bytes"] - result["baseline_anon_bytes"]),
            "masks_sha256": result["masks_sha256"]}  # fmt: skip


def measure(shape: dict, cache: Path, fresh: bool = True) -> dict:
    """Every depth, method and mode; ratios to the floor and to the in-memory time."""
    report = {"shape": shape, "targets": TARGETS, "depths": {}}
    for layers in shape["depths"]:
        checkpoint = write_checkpoint(shape, layers, cache)
        entry = report["depths"][str(layers)] = {}
        for method in METHODS:
            cases = {mode: run_case(checkpoint, method, mode, shape, fresh) for mode in MODES}
            floor = floor_bytes(shape, layers, method)
            disk, memory = cases["disk"], cases["memory"]
            entry[method] = {
                **cases, "floor": floor,
                "masks_equal": disk["masks_sha256"] == memory["masks_sha256"],
                "peak_over_floor": disk["peak_anon"] / floor["total"],
                "time_disk_over_memory": disk["seconds"] / memory["seconds"],
            }  # fmt: skip
            print(f"{layers} blocks, {method}: {json.dumps(entry[method])}", flush=True)
    return report


def render(report: dict) -> str:
    """The report as Markdown: one row per depth and method."""
    gib = 1 << 30
    lines = [
        "| blocks | parameters | method | masks equal | time memory (s) | time disk (s) | "
        "disk / memory | peak anon memory (GiB) | peak anon disk (GiB) | floor (GiB) | "
        "disk peak / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layers, methods in report["depths"].items():
        for method, e in methods.items():
            f = e["floor"]
            lines.append(
                f"| {layers} | {f['parameters'] / 1e9:.2f} B | {method} | {e['masks_equal']} | "
                f"{e['memory']['seconds']:.1f} | {e['disk']['seconds']:.1f} | "
                f"{e['time_disk_over_memory']:.2f}x | {e['memory']['peak_anon'] / gib:.2f} | "
                f"{e['disk']['peak_anon'] / gib:.2f} | {f['total'] / gib:.2f} | "
                f"{e['peak_over_floor']:.2f}x |"
            )
    targets = report["targets"]
    lines.append(
        f"\nTargets: disk peak within {targets['peak_over_floor']}x the floor, disk time within "
        f"{targets['time_disk_over_memory']}x the in-memory time."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny shape in-process (tests)")
    parser.add_argument("--depths", type=int, nargs="+", help="numbers of blocks to run")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_onload"))
    parser.add_argument("--cache", type=Path, default=Path("outputs/bench_onload/models"))
    parser.add_argument("--windows", type=int, help="calibration windows (default 4)")
    parser.add_argument("--seqlen", type=int, help="tokens per window (default 128)")
    args = parser.parse_args(argv)
    shape = dict(SMOKE if args.smoke else FULL)
    for key in ("depths", "windows", "seqlen"):
        if getattr(args, key):
            shape[key] = getattr(args, key)
    report = measure(shape, args.cache, fresh=not args.smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    (args.out / f"onload_{stamp}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"onload_{stamp}.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
