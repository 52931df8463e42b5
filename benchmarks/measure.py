"""One measurement: a configuration pruned through :func:`gblm.pipeline.prune` in a fresh process.

:func:`measure` runs ``python -m benchmarks.measure '<config as JSON>'`` and returns what the
child printed: the seconds of every stage as the pipeline's own :class:`gblm.utils.StageTimer`
timed them, the peak memory of each stage and of the whole process, the FLOP and memory floors
of the configuration (:mod:`benchmarks.flops`), the matmul rate and copy bandwidth measured in the
same process just before the run, and a digest of the masks.

Memory. On the CPU the stage peak is the resident set's high-water mark (``VmHWM``), reset at
the stage's start through ``/proc/self/clear_refs`` by a listener on the stage timer;
``build_peak_bytes`` is the mark before the first stage (the model built, the windows drawn) and
the process peak the largest of all (where the kernel refuses the reset, ``ru_maxrss`` of the
process, and no stage peaks). ``baseline_rss`` is the resident set after the imports,
before the model exists: the peak above it is what the run itself held. With ``sample_anon`` a
thread also samples ``RssAnon`` every 10 ms (anonymous memory: what a disk-backed model must not
grow). On CUDA the peaks are ``torch.cuda.max_memory_allocated``, reset at every stage's start,
and the listener synchronises the device at each stage's start and end, so ``synced`` holds the
seconds between synchronisations beside the timer's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gblm.pipeline import perplexity_stage

STATUS = Path("/proc/self/status")
#: The stage the benchmark times itself, in the same timer: the pruned model's perplexity.
EVALUATION = perplexity_stage("pruned")


@dataclass(frozen=True)
class Config:
    """What one measurement runs.

    ``model``: ``{"smollm2": True}`` (the embedded SmolLM2-135M as the loader maps it),
    ``{"llama": {LlamaConfig arguments}}`` (seeded random init, built on ``device``) or
    ``{"checkpoint": path, "private": bool}`` (a safetensors folder, memory-mapped; ``private``
    copies every weight into ordinary memory, as a model that fits).
    """

    model: dict[str, Any]
    method: str = "wanda"
    options: dict[str, Any] = field(default_factory=dict)  # the method's, as in its yaml
    allocator: str = "uniform"  # conf/sparsity's allocator: uniform, owl, ...
    sparsity: float = 0.5
    nsamples: int = 32
    seqlen: int = 256
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int | str = "auto"
    onload: bool = False
    threads: int | None = None  # torch's intra-op threads; None: a run's default; 0: torch's own
    eval_windows: int = 0  # perplexity of the pruned model on this many random windows
    eval_batch_size: int = 1
    sample_anon: bool = False


def measure(
    config: Config,
    fresh: bool = True,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``config`` in a fresh Python process (``fresh=False``: in this one, for the smoke
    tests: the peaks are then this process's); its result (see the module docstring). ``env``:
    the child's whole environment (None: this one's; the OpenMP runtime reads it at start)."""
    if not fresh:
        return json.loads(json.dumps(run(config)))
    command = [sys.executable, "-m", "benchmarks.measure", json.dumps(asdict(config))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                          env=env)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{config.method} on {config.model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Memory ------------------------------------------------------------------------------------------
def status_bytes(key: str) -> int | None:
    """A ``kB`` line of ``/proc/self/status`` in bytes (None off Linux)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_high_water_mark() -> bool:
    """Set ``VmHWM`` to the resident set now; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StageMemory:
    """A :class:`gblm.utils.StageTimer` listener: each stage's peak memory (and, on CUDA, its
    seconds between device synchronisations)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.peaks: dict[str, int] = {}
        self.synced: dict[str, float] = {}
        self.process_peak = 0 if self.cuda else status_bytes("VmHWM") or 0
        self.build_peak: int | None = None  # the peak before the first stage: load, windows
        self.resettable = True
        self._began = 0.0

    def __call__(self, event: str, stage: str, seconds: float | None, done: int) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if event == "start":
            if self.cuda:
                before = torch.cuda.max_memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                before = status_bytes("VmHWM") or 0
                self.resettable = self.resettable and reset_high_water_mark()
            self.process_peak = max(self.process_peak, before)
            if self.build_peak is None:
                self.build_peak = before
            self._began = time.perf_counter()
            return
        self.synced[stage] = self.synced.get(stage, 0.0) + time.perf_counter() - self._began
        peak = (
            torch.cuda.max_memory_allocated(self.device)
            if self.cuda
            else status_bytes("VmHWM") or 0
        )
        self.peaks[stage] = max(self.peaks.get(stage, 0), peak)
        self.process_peak = max(self.process_peak, peak)


class AnonSampler:
    """The highest ``RssAnon`` seen by a thread that samples it every ``interval`` seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        self.peak = status_bytes("RssAnon") or 0
        self._stop, self._interval = threading.Event(), interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, status_bytes("RssAnon") or 0)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_bytes("RssAnon") or 0)


# Rates ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(work, device: torch.device, repeats: int = 5) -> float:
    work()  # warm up: kernels chosen, pages touched
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        work()
        _sync(device)
        best = min(best, time.perf_counter() - began)
    return best


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul in ``dtype`` (n = 2048 on the CPU, 8192 on a GPU), best of 20.

    A best of 5 products of n = 1024 (a few ms each) read anywhere from 100 to 360 GFLOP/s on two
    cores from one fresh process to the next, which made floors of the same FLOPs differ 2x.
    """
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), device, repeats=20)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s read plus written by a copy of 32 MiB (256 MiB on a GPU), best of 5."""
    n = (256 if device.type == "cuda" else 32) << 18  # fp32 elements
    src, dst = torch.ones(n, device=device), torch.empty(n, device=device)
    return 2 * 4 * n / _best_seconds(lambda: dst.copy_(src), device)


def machine() -> dict[str, Any]:
    """The CPU, its cores, torch and its threads, the load average now."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip


# The child ---------------------------------------------------------------------------------------
def build_model(config: Config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``config.model`` (see :class:`Config`), in eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    spec = config.model
    if spec.get("smollm2"):
        from gblm.models.loading import ModelSpec, load_model, load_tokenizer

        return load_model(ModelSpec(), device, dtype, load_tokenizer(ModelSpec()))
    if "llama" in spec:
        torch.manual_seed(0)
        llama = LlamaConfig(**spec["llama"], tie_word_embeddings=False)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(llama, dtype=dtype).eval()
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype).eval()
    if spec.get("private"):  # every weight in ordinary (anonymous) memory
        for p in model.parameters():
            p.data = p.data.clone()
    return model if config.onload else model.to(device)


def masks_digest(masks) -> tuple[str, float]:
    """sha256 over every mask's name and bits (equal digests, equal masks), and the share of
    entries pruned."""
    digest, pruned, total = hashlib.sha256(), 0, 0
    for name in masks:
        mask = masks[name].cpu()
        digest.update(name.encode())
        digest.update(mask.numpy().tobytes())
        pruned, total = pruned + int(mask.sum()), total + mask.numel()
    return digest.hexdigest(), pruned / max(total, 1)


def run(config: Config) -> dict[str, Any]:
    """Build, prune through the pipeline, evaluate if asked; in this process."""
    from transformers import LlamaForCausalLM  # noqa: F401 (imported before the baseline)

    from benchmarks import flops
    from gblm import api, pipeline
    from gblm.devices import resolve_dtype
    from gblm.methods.base import RunContext
    from gblm.methods.registry import build_allocator, build_method
    from gblm.pruning.sparsity import Sparsity
    from gblm.utils import StageTimer

    if config.threads:
        torch.set_num_threads(config.threads)
    elif config.threads is None:  # a run's default (0: torch's own)
        from gblm.devices import default_threads

        default_threads()
    device = torch.device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    rates = {"matmul_flops": matmul_rate(device, dtype), "copy_bytes": copy_bandwidth(device)}
    # The rates' operands are gone: the peaks count the run alone. The baseline is read from the
    # same counter as the peaks: the kernel's resident count is approximate (per-CPU batches), so
    # a ``VmRSS`` read may lie a few pages above a later ``VmHWM`` in a run that holds little.
    resident = "VmHWM" if reset_high_water_mark() else "VmRSS"
    baseline = {"rss": status_bytes(resident) or 0, "anon": status_bytes("RssAnon") or 0}
    sampler = AnonSampler() if config.sample_anon else None
    model = build_model(config, device, dtype)
    method = build_method(config.method, **config.options)
    plan = build_allocator(config.allocator, Sparsity(config.sparsity))
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    windows = None
    if pipeline.needs_calibration(method, plan):
        windows = torch.randint(0, vocab, (config.nsamples, config.seqlen), generator=generator)
        windows = windows.to(device)
    context = RunContext(device=device, model_dtype=dtype, progress=False, onload=config.onload,
                         batch_size=config.batch_size,
                         method_calibrates=method.needs_calibration)  # fmt: skip
    floors = flops.stage_floors(model, method, plan, config.nsamples, config.seqlen)
    memory_floor = flops.memory_floor(model, method, config.nsamples, config.seqlen)
    timer, memory = StageTimer(), StageMemory(device)
    timer.listeners.append(memory)
    masks = pipeline.prune(model, method, plan, windows, context, timer)
    peak_anon = sampler.stop() if sampler else None
    ppl = None
    if config.eval_windows:
        tokens = torch.randint(0, vocab, (1, config.eval_windows * config.seqlen),
                               generator=generator)  # fmt: skip
        with timer.stage(EVALUATION):
            ppl = api.evaluate(model, data=tokens, seqlen=config.seqlen, progress=False,
                               batch_size=config.eval_batch_size, device=device)  # fmt: skip
        floors[EVALUATION] = {"flops": flops.model_forward_flops(
            flops.model_counts(model), config.eval_windows, config.seqlen), "bytes": 0}  # fmt: skip
    digest, sparsity = masks_digest(masks)
    if not memory.resettable and device.type == "cpu":  # the high-water marks were not reset
        memory.peaks, memory.build_peak = {}, None
        memory.process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "config": asdict(config),
        "seconds": timer.timings,
        "synced_seconds": memory.synced if device.type == "cuda" else None,
        "stage_peak_bytes": memory.peaks,
        "peak_bytes": memory.process_peak,
        "build_peak_bytes": memory.build_peak,
        "baseline_bytes": baseline["rss"] if device.type == "cpu" else 0,
        "peak_anon_bytes": peak_anon,
        "baseline_anon_bytes": baseline["anon"],
        "floors": floors,
        "memory_floor": memory_floor,
        "counts": flops.model_counts(model).as_dict(),
        "rates": rates,
        "masks_sha256": digest,
        "sparsity": sparsity,
        "ppl": ppl,
        "machine": machine(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    (text,) = sys.argv[1:] if argv is None else argv
    result = run(Config(**json.loads(text)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
