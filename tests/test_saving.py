"""Saving pruned models (weights, tokenizer, packed masks, record; atomically), evaluating a saved
one without pruning again, and models placed with ``model.device_map`` through ``run()``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gblm.models.saving import (
    MASKS_FILE,
    RECORD_FILE,
    load_masks,
    pack_mask,
    save_pruned_model,
    unpack_mask,
)
from tests.conftest import compose_config

# Small and fast: 4 windows of 64 tokens, perplexity on 4 windows.
SMALL = [
    "calibration.nsamples=4",
    "calibration.seqlen=64",
    "eval.perplexity.max_windows=4",
    "progress=false",
    "mask_images=[]",
]


def _run(tmp_path: Path, name: str, *overrides: str, device_map=None) -> dict:
    from gblm.run import run

    cfg = compose_config(*SMALL, *overrides)
    if device_map is not None:
        cfg.model.device_map = device_map
    return run(cfg, tmp_path / name)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (16, 24), (2, 3, 11)])
def test_pack_unpack_roundtrip_in_packbits_order(shape):
    mask = torch.rand(shape) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    flat = mask.reshape(-1).tolist() + [False] * (-mask.numel() % 8)
    expected = [
        sum(bit << (7 - i) for i, bit in enumerate(flat[j : j + 8])) for j in range(0, len(flat), 8)
    ]
    assert packed.tolist() == expected  # first entry in the top bit, zero padding at the end
    assert torch.equal(unpack_mask(packed, shape), mask)


class _Tokenizer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_pretrained(self, directory) -> None:
        if self.fail:
            raise OSError("disk full")
        (Path(directory) / "tokenizer.json").write_text("{}")


def test_save_is_atomic_and_replaces(tmp_path, tiny_llama):
    out = tmp_path / "model"
    masks = {"model.layers.0.mlp.down_proj": torch.rand(64, 128) < 0.5}
    assert save_pruned_model(tiny_llama, _Tokenizer(), masks, out, {"status": "running"}) == out
    assert (out / "config.json").exists() and (out / MASKS_FILE).exists()
    assert (out / "config.json").stat().st_mode & 0o044  # not left 0600 / 0700 from the temp dir
    assert tiny_llama.config.use_cache is True  # the fixture's value, restored
    # a failing save leaves the previous directory as it was, and no temporary dirs behind
    with pytest.raises(OSError, match="disk full"):
        save_pruned_model(tiny_llama, _Tokenizer(fail=True), {}, out, {})
    assert torch.equal(
        load_masks(out)["model.layers.0.mlp.down_proj"], masks["model.layers.0.mlp.down_proj"]
    )
    # a second save replaces it
    save_pruned_model(tiny_llama, _Tokenizer(), {}, out, {"status": "finished"})
    assert not (out / MASKS_FILE).exists()
    assert json.loads((out / RECORD_FILE).read_text())["metrics"]["status"] == "finished"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_reload_gives_same_perplexity_and_zeros(tmp_path):
    """save_model=true, then model=hf model.name_or_path=<run dir>/model method=dense: same numbers."""
    from transformers import AutoModelForCausalLM

    pruned = _run(tmp_path, "prune", "model=tiny_llama", "method=wanda", "save_model=true")
    saved = Path(pruned["saved_model"])
    assert saved == tmp_path / "prune" / "model"
    again = _run(tmp_path, "eval", "model=hf", f"model.name_or_path={saved}", "method=dense")
    assert again["ppl"]["dense"] == pytest.approx(pruned["ppl"]["pruned"], rel=1e-6)
    # the convenience group resolves to the same directory
    cfg = compose_config("model=saved", f"model.run_dir={tmp_path / 'prune'}", "method=dense")
    assert cfg.model.name_or_path == str(saved) and cfg.model.kind == "hf"

    masks = load_masks(saved)
    assert len(masks) == 14  # 7 Linears x 2 blocks
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.config.use_cache is True
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert weight.shape == mask.shape
        assert torch.all(weight[mask] == 0)
        assert mask.float().mean().item() == pytest.approx(0.5, abs=0.01)
    record = json.loads((saved / RECORD_FILE).read_text())
    assert record["masks"]["ratio"] == pytest.approx(0.5, abs=0.01)
    assert record["metrics"]["method"] == "wanda"


# device_map --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer) -> Path:
    """A dense tiny llama saved as a Hugging Face checkpoint (what a big model on disk looks like)."""
    from gblm.models.tiny import build_tiny_model, tiny_config

    model = build_tiny_model(tiny_config("llama", vocab_size=len(tokenizer)), seed=0)
    return save_pruned_model(model, tokenizer, {}, tmp_path_factory.mktemp("tiny") / "model", {})


@pytest.fixture
def small_local_data(tmp_path, monkeypatch) -> list[str]:
    """Own caches (so the gradient stage really runs) and a small local text (fast to tokenize)."""
    monkeypatch.setenv("GBLM_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The {i % 50}th word of a sentence, said Emma." for i in range(3000)))
    return [
        "calibration=local",
        f"calibration.paths=[{text}]",
        "eval.perplexity.dataset=local",
        f"eval.perplexity.paths=[{text}]",
        "eval.perplexity.dense=false",
    ]


PER_MODULE = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.mark.parametrize(
    "device_map",
    [
        None,
        "auto",
        PER_MODULE,
        pytest.param("cpu", marks=pytest.mark.slow),
        pytest.param({"": "cpu"}, marks=pytest.mark.slow),
    ],
    ids=["none", "auto", "per-module", "cpu", "all-cpu"],
)
def test_device_map_runs_the_walk_and_gradient_stage(
    tmp_path, saved_tiny, small_local_data, device_map
):
    """GBLM (gradient stage + layer walk) on a model loaded with device_map: same result as without."""
    metrics = _run(
        tmp_path,
        "run",
        "model=hf",
        f"model.name_or_path={saved_tiny}",
        "method=gblm",
        "device=cpu",
        *small_local_data,
        device_map=device_map,
    )
    assert metrics["status"] == "finished"
    assert "gradients" in metrics["timings"] and "prune" in metrics["timings"]
    assert list((tmp_path / "cache" / "gradients").glob("*.safetensors"))  # computed, not reused
    assert metrics["sparsity_check"]["overall"] == pytest.approx(0.5, abs=0.01)
    reference = _REFERENCE.setdefault("ppl", metrics["ppl"]["pruned"])
    assert metrics["ppl"]["pruned"] == pytest.approx(reference, rel=1e-5)


_REFERENCE: dict[str, float] = {}  # the first device_map case's perplexity (all run on the CPU)


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_count() < 1, reason="needs a CUDA device")
@pytest.mark.parametrize("device_map", ["auto", {"": "cuda:0"}], ids=["auto", "all-cuda0"])
def test_cuda_device_map_places_and_runs(tmp_path, saved_tiny, small_local_data, device_map):
    from gblm.models.loading import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec(kind="hf", name="tiny", name_or_path=str(saved_tiny), device_map=device_map)
    model = load_model(spec, torch.device("cuda"), torch.float16, load_tokenizer(spec))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    metrics = _run(
        tmp_path,
        "run",
        "model=hf",
        f"model.name_or_path={saved_tiny}",
        "method=gblm",
        "device=cuda",
        *small_local_data,
        device_map=device_map,
    )
    assert metrics["status"] == "finished" and metrics["device"].startswith("cuda")
    assert metrics["sparsity_check"]["overall"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_count() < 2, reason="needs two CUDA devices")
def test_model_split_over_two_gpus_runs(tmp_path, saved_tiny, small_local_data):
    split = {
        "model.embed_tokens": "cuda:0",
        "model.rotary_emb": "cuda:0",
        "model.layers.0": "cuda:0",
        "model.layers.1": "cuda:1",
        "model.norm": "cuda:1",
        "lm_head": "cuda:1",
    }
    metrics = _run(
        tmp_path,
        "run",
        "model=hf",
        f"model.name_or_path={saved_tiny}",
        "method=gblm",
        "device=cuda",
        *small_local_data,
        device_map=split,
    )
    assert metrics["status"] == "finished"
    assert metrics["sparsity_check"]["overall"] == pytest.approx(0.5, abs=0.01)


def test_atomic_write_bytes_callback_and_directory(tmp_path):
    from gblm.utils import atomic_write, atomic_write_json, atomic_write_text

    path = tmp_path / "sub" / "a.txt"
    assert atomic_write_text(path, "first\r\nline") == path
    assert path.read_bytes() == b"first\r\nline"  # newlines as given
    assert path.stat().st_mode & 0o044  # the mode of a plain open, not mkstemp's 0600
    atomic_write(path, lambda tmp: torch.save({"x": 1}, tmp))
    assert torch.load(path) == {"x": 1}
    atomic_write_json(tmp_path / "b.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "b.json").read_text()) == {"k": [1, 2]}

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert torch.load(path) == {"x": 1}  # untouched

    folder = tmp_path / "folder"
    atomic_write(folder, lambda tmp: (tmp / "one").write_text("1"), directory=True)
    atomic_write(folder, lambda tmp: (tmp / "two").write_text("2"), directory=True)
    assert sorted(p.name for p in folder.iterdir()) == ["two"]  # replaced whole
    leftovers = [p.name for p in tmp_path.rglob(".*")]
    assert leftovers == []  # no temporary file or folder left behind
