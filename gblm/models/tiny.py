"""Small seeded random-init models, one per supported architecture: every code path in seconds
(their perplexities mean nothing)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

from gblm.errors import ConfigError

ARCHITECTURES = ("llama", "mistral", "qwen2", "opt")


def tiny_config(
    arch: str = "llama",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    vocab_size: int = 49152,
    max_positions: int = 2048,
) -> PretrainedConfig:
    """A small config of ``arch``; the vocabulary defaults to SmolLM2's so its tokenizer fits.
    A ConfigError names the ``model.tiny`` key of an unknown architecture, a bad size, or heads
    that do not divide the hidden size (the attention reshapes would fail inside the model)."""
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"model.tiny.arch={arch!r}: allowed values are {', '.join(ARCHITECTURES)}."
        )
    kv = num_kv_heads or num_heads
    sizes = {"hidden_size": hidden_size, "intermediate_size": intermediate_size,
             "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": kv}  # fmt: skip
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.tiny.{key}={value!r}: allowed values are integers >= 1.")
    if hidden_size % num_heads:
        raise ConfigError(
            f"model.tiny.hidden_size={hidden_size} is not divisible by model.tiny.num_heads="
            f"{num_heads}: allowed are hidden sizes that are a multiple of the head count."
        )
    if num_heads % kv:
        raise ConfigError(
            f"model.tiny.num_kv_heads={kv} does not divide model.tiny.num_heads={num_heads}: "
            "allowed are divisors of the head count."
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=num_heads,
            ffn_dim=intermediate_size, num_hidden_layers=num_layers,
            max_position_embeddings=max_positions, word_embed_proj_dim=hidden_size,
            do_layer_norm_before=True, enable_bias=True,
        )  # fmt: skip
    config_class, extra = {
        "llama": (LlamaConfig, {"tie_word_embeddings": False}),
        "mistral": (MistralConfig, {"sliding_window": None}),
        "qwen2": (Qwen2Config, {"tie_word_embeddings": False}),
    }[arch]
    return config_class(
        vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, num_hidden_layers=num_layers,
        num_key_value_heads=kv, max_position_embeddings=max_positions, **extra,
    )  # fmt: skip


def tiny_model_config(args: Mapping[str, Any], vocab_size: int = 49152) -> PretrainedConfig:
    """The :func:`tiny_config` of the ``model.tiny`` arguments (their ``seed`` aside); a
    ConfigError names a key it cannot take."""
    allowed = [k for k in inspect.signature(tiny_config).parameters if k != "vocab_size"]
    for key in args:
        if key not in (*allowed, "seed"):
            raise ConfigError(
                f"model.tiny.{key}: not a key of a tiny model: the keys of model.tiny are "
                f"{', '.join(allowed)}, seed."
            )
    return tiny_config(**{k: v for k, v in args.items() if k != "seed"}, vocab_size=vocab_size)


def build_tiny_model(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init causal LM from ``config``, deterministic in ``seed``."""
    with torch.random.fork_rng(devices=[]):  # the caller's (CPU) random state is left as found
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
