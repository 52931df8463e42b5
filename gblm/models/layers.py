"""Where the decoder blocks and their prunable Linears are, per architecture.

Only the Linears inside decoder blocks are pruned; embeddings and the LM head never are.
"""

from __future__ import annotations

from torch import nn

from gblm.names import module_type  # the type mapping is pure naming: it lives in gblm.names

# Attribute paths of the decoder-block list, tried in order.
_BLOCK_PATHS = (
    "model.layers",  # LLaMA, Mistral, Qwen2, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, Falcon, BLOOM
    "gpt_neox.layers",  # Pythia / GPT-NeoX
)

# SparseGPT's true_sequential groups, by module type.
SEQUENTIAL_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up", "fc1"), ("down", "fc2"))


def _get(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM."""
    for path in _BLOCK_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"Unsupported architecture {type(model).__name__}: no decoder-block list at any of "
        f"{', '.join(_BLOCK_PATHS)}."
    )


def decoder_layers_path(model: nn.Module) -> str:
    for path in _BLOCK_PATHS:
        if isinstance(_get(model, path), nn.ModuleList):
            return path
    decoder_layers(model)  # raises with the message
    return ""


def prunable_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` in a block, by its name inside the block (e.g. ``self_attn.q_proj``)."""
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


def linear_names(config, trust_remote_code: bool = False) -> list[str]:
    """The full names of the prunable Linears of the model that ``config`` describes, read from
    its skeleton on the meta device (no weight is made), in the walk's order."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    prefix = decoder_layers_path(model)
    blocks = decoder_layers(model)
    return [
        f"{prefix}.{b}.{name}" for b, block in enumerate(blocks) for name in prunable_linears(block)
    ]


def sequential_groups(names: list[str]) -> list[list[str]]:
    """Split a block's Linear names into SparseGPT's true-sequential order; leftovers go last."""
    groups: list[list[str]] = []
    seen: set[str] = set()
    for types in SEQUENTIAL_GROUPS:
        group = [n for n in names if module_type(n) in types]
        if group:
            groups.append(group)
            seen.update(group)
    rest = [n for n in names if n not in seen]
    if rest:
        groups.append(rest)
    return groups
