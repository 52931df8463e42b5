"""Where the decoder blocks and their prunable Linears are, per architecture.

Only the Linears inside decoder blocks are pruned; embeddings and the LM head never are.
"""

from __future__ import annotations

from operator import attrgetter

import torch
from torch import nn

from gblm.names import module_type

# Attribute paths of the decoder-block list, tried in order.
_BLOCK_PATHS = (
    "model.layers",  # LLaMA, Mistral, Qwen2, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, Falcon, BLOOM
    "gpt_neox.layers",  # Pythia / GPT-NeoX
)

# SparseGPT's true_sequential groups, by module type.
SEQUENTIAL_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up", "fc1"), ("down", "fc2"))


def decoder_layers_path(model: nn.Module) -> str:
    """The attribute path of the decoder-block list (e.g. ``model.layers``)."""
    for path in _BLOCK_PATHS:
        try:
            if isinstance(attrgetter(path)(model), nn.ModuleList):
                return path
        except AttributeError:
            continue
    raise ValueError(
        f"Unsupported architecture {type(model).__name__}: no decoder-block list at any of "
        f"{', '.join(_BLOCK_PATHS)}."
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM."""
    return attrgetter(decoder_layers_path(model))(model)


def prunable_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` in a block, by its name inside the block (e.g. ``self_attn.q_proj``)."""
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


def linear_names(config, trust_remote_code: bool = False) -> list[str]:
    """The full names of the prunable Linears of the model that ``config`` describes, read from
    its skeleton on the meta device (no weight is made), in the walk's order."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    prefix = decoder_layers_path(model)
    return [
        f"{prefix}.{b}.{name}"
        for b, block in enumerate(decoder_layers(model))
        for name in prunable_linears(block)
    ]


def sequential_groups(names: list[str]) -> list[list[str]]:
    """Split a block's Linear names into SparseGPT's true-sequential order; leftovers go last."""
    groups = [[n for n in names if module_type(n) in types] for types in SEQUENTIAL_GROUPS]
    grouped = {n for group in groups for n in group}
    groups.append([n for n in names if n not in grouped])
    return [group for group in groups if group]
