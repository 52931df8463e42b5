"""Caches keyed by content and checked on load: the calibration windows and the gradient norms.

An edited data file gives new windows, another model saved at the same path new gradient norms;
a damaged or truncated cache entry is rebuilt with a warning that names the file.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from gblm.calibration.sequential import prune_model
from gblm.data.calibration import cached_windows
from gblm.methods.base import RunContext
from gblm.methods.registry import build_method
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity
from gblm.run import run
from tests.conftest import compose_config, save_tiny_model

QUICK = (
    "calibration.nsamples=4",
    "calibration.seqlen=32",
    "eval.perplexity.enabled=false",
    "progress=false",
    "mask_images=[]",
)


def _windows_files(cache) -> list:
    return sorted((cache / "calibration").glob("windows_*.safetensors"))


def test_edited_data_file_gives_new_windows(cache, tmp_path):
    data = tmp_path / "calibration.txt"
    overrides = ("model=tiny_llama", "method=wanda", "calibration=local")
    cfg = compose_config(*overrides, f"calibration.paths=[{data}]", *QUICK)
    data.write_text(" ".join(f"alpha{i} beta{i % 7}" for i in range(300)), encoding="utf-8")
    run(cfg, run_dir=tmp_path / "first")
    assert len(_windows_files(cache)) == 1
    data.write_text(" ".join(f"gamma{i} delta{i % 5}" for i in range(300)), encoding="utf-8")
    run(cfg, run_dir=tmp_path / "edited")  # same path, same settings, new text
    files = _windows_files(cache)
    assert len(files) == 2
    first, edited = (torch.load(f, weights_only=True)["windows"] for f in files)
    assert not torch.equal(first, edited)


def test_another_model_at_the_same_path_gets_new_gradients(cache, tmp_path):
    model_dir = tmp_path / "model"
    cfg = compose_config("model=hf", f"model.name_or_path={model_dir}", "method=gblm", *QUICK)
    save_tiny_model(model_dir, seed=0)
    run(cfg, run_dir=tmp_path / "first")
    save_tiny_model(model_dir, seed=1)  # another model, the same path
    run(cfg, run_dir=tmp_path / "second")
    entries = sorted((cache / "gradients").glob("grad_*.safetensors"))
    assert len(entries) == 2  # computed again, not the first model's norms
    norms = [load_file(p) for p in entries]
    name = sorted(norms[0])[0]
    assert not torch.equal(norms[0][name], norms[1][name])


def _gblm_masks(cache_dir, windows):
    model = build_tiny_model(tiny_config("llama", vocab_size=256), seed=0)
    method = build_method("gblm")
    context = RunContext(
        device=torch.device("cpu"),
        model_dtype=torch.float32,
        model_id="tiny-test",
        cache_dir=cache_dir,
        progress=False,
    )
    method.prepare(model, windows, context)
    return prune_model(model, method, Sparsity(0.5), windows, device="cpu", progress=False)


def _flip_tensor_bytes(path, start: int = 64, count: int = 64) -> None:
    """Flip ``count`` bytes of a safetensors file's tensor data, leaving its header intact."""
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    for i in range(data_start + start, data_start + start + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_gradient_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    fresh = _gblm_masks(None, windows)
    _gblm_masks(tmp_path, windows)  # writes the entry
    [path] = (tmp_path / "gradients").glob("grad_*.safetensors")
    good = {n: t.clone() for n, t in load_file(path).items()}  # not the file's memory map
    _flip_tensor_bytes(path)
    damaged = load_file(path)  # the header is intact: it still loads, with other values
    assert any(not torch.equal(good[n], damaged[n]) for n in good)
    with caplog.at_level(logging.WARNING, logger="gblm"):
        rebuilt = _gblm_masks(tmp_path, windows)
    assert str(path) in caplog.text and "checksum mismatch" in caplog.text
    assert set(rebuilt) == set(fresh)
    assert all(torch.equal(rebuilt[n], fresh[n]) for n in fresh)
    assert _gblm_masks(tmp_path, windows).keys() == fresh.keys()  # whole again: loaded


def test_truncated_gradient_cache_is_rebuilt(tmp_path, caplog):
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    fresh = _gblm_masks(tmp_path, windows)
    [path] = (tmp_path / "gradients").glob("grad_*.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="gblm"):
        rebuilt = _gblm_masks(tmp_path, windows)
    assert str(path) in caplog.text
    assert all(torch.equal(rebuilt[n], fresh[n]) for n in fresh)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_windows_cache_is_rebuilt(tmp_path, caplog, damage):
    calls = []

    def make():
        calls.append(1)
        return torch.arange(4096, dtype=torch.long).reshape(64, 64)

    first = cached_windows(tmp_path, "key", make)
    path = tmp_path / "calibration" / "windows_key.safetensors"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # the tensor's bytes behind an intact header: the file still loads
        _flip_tensor_bytes(path)
    with caplog.at_level(logging.WARNING, logger="gblm"):
        again = cached_windows(tmp_path, "key", make)
    assert len(calls) == 2 and torch.equal(again, first)
    assert str(path) in caplog.text and "computing it again" in caplog.text
    cached_windows(tmp_path, "key", make)
    assert len(calls) == 2  # the rebuilt entry is whole: loaded, not made again


def test_windows_key_follows_a_python_tokenizers_special_tokens():
    """A tokenizer without a Rust backend (remote code, sentencepiece-only) was keyed by its
    vocabulary alone: one that adds a BOS shared the windows cached for one that does not."""
    from transformers import PreTrainedTokenizer

    from gblm.data.calibration import tokenizer_digest

    class Chars(PreTrainedTokenizer):
        def __init__(self, bos: bool = False, **kwargs):
            self.vocab, self.bos = {chr(i): i for i in range(32, 127)} | {"<s>": 1}, bos
            super().__init__(bos_token="<s>", **kwargs)

        def get_vocab(self):
            return dict(self.vocab)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return chr(index)

        def build_inputs_with_special_tokens(self, ids, pair=None):
            return [1] * self.bos + ids

    plain, with_bos = Chars(), Chars(bos=True)
    assert plain("Hi").input_ids != with_bos("Hi").input_ids
    assert tokenizer_digest(plain) != tokenizer_digest(with_bos)
    assert tokenizer_digest(plain) == tokenizer_digest(Chars())


def test_windows_key_follows_a_fast_tokenizers_split_special_tokens():
    """``split_special_tokens: true`` (tokenizer_config.json) splits a special token's text into
    ordinary tokens; the fast tokenizer's definition does not hold it, so a tokenizer that splits
    shared the windows cached for one that does not (a rerun on the edited tokenizer got the
    earlier run's windows)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gblm.data.calibration import tokenizer_digest

    vocab = {"[UNK]": 0, "<s>": 1, **{chr(i): i for i in range(32, 127)}}

    def make(**kwargs):
        backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", **kwargs
        )

    whole, split = make(), make(split_special_tokens=True)
    assert whole("a<s>b").input_ids != split("a<s>b").input_ids
    assert tokenizer_digest(whole) != tokenizer_digest(split)
    assert tokenizer_digest(whole) == tokenizer_digest(make())
