"""Names of the prunable Linears: their short module type and their decoder-block index."""

from __future__ import annotations

# Short module types, for per-type statistics (and the column order of per-type tables).
MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "fc1", "fc2", "other")
_TYPE_BY_SUFFIX = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
                   "dense": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
                   "fc1": "fc1", "fc2": "fc2"}  # fmt: skip


def module_type(name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``q`` (its last component's type); unknown names ->
    ``other``."""
    return _TYPE_BY_SUFFIX.get(name.rsplit(".", 1)[-1], "other")


def block_index(name: str) -> int | None:
    """The first all-digit component of a full Linear name (``model.layers.3.mlp.down_proj`` ->
    3), else None."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def in_block_name(name: str) -> str:
    """A full Linear name's part after its block index (``model.layers.3.mlp.down_proj`` ->
    ``mlp.down_proj``, ``model.decoder.layers.3.fc1`` -> ``fc1``): the name a plan is asked by."""
    parts = name.split(".")
    start = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), 0)
    return ".".join(parts[start:])
