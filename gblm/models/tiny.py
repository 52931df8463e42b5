"""Small seeded models built from a config, one per supported architecture, for fast tests.

They are random-init, so their perplexities mean nothing; they exercise every code path (the layer
walk, the gradient stage, all four methods) on the architectures gblm supports in seconds.
"""

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

    Raises a ConfigError naming the ``model.tiny`` key for an unknown architecture or heads
    that do not divide the hidden size (the attention reshapes would fail inside the model).
    """
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
    decoder = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_key_value_heads=kv,
        max_position_embeddings=max_positions,
    )
    if arch == "llama":
        return LlamaConfig(**decoder, tie_word_embeddings=False)
    if arch == "mistral":
        return MistralConfig(**decoder, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**decoder, tie_word_embeddings=False)
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_attention_heads=num_heads,
            ffn_dim=intermediate_size,
            num_hidden_layers=num_layers,
            max_position_embeddings=max_positions,
            word_embed_proj_dim=hidden_size,
            do_layer_norm_before=True,
            enable_bias=True,
        )
    raise AssertionError(arch)  # every architecture is handled above


def check_tiny_arguments(args: Mapping[str, Any]) -> None:
    """Raise a ConfigError naming the ``model.tiny`` key that :func:`tiny_config` (or the seed)
    cannot take: an unknown key, architecture, size or head count."""
    allowed = [k for k in inspect.signature(tiny_config).parameters if k != "vocab_size"]
    for key in args:
        if key not in (*allowed, "seed"):
            raise ConfigError(
                f"model.tiny.{key}: not a key of a tiny model: the keys of model.tiny are "
                f"{', '.join(allowed)}, seed."
            )
    tiny_config(**{k: v for k, v in args.items() if k != "seed"})


def build_tiny_model(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init causal LM from ``config``, deterministic in ``seed``."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()
