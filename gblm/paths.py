"""Where gblm keeps caches and runs, and whether the model/dataset hub can be reached."""

from __future__ import annotations

import functools
import os
import socket
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """``$GBLM_CACHE_DIR`` or ``<project>/outputs/cache``: calibration windows, gradients, models."""
    return Path(os.environ.get("GBLM_CACHE_DIR", PROJECT_ROOT / "outputs" / "cache"))


@functools.cache
def hub_reachable() -> bool:
    """True when the Hugging Face hub answers within 3 s; False offline or when ``HF_HUB_OFFLINE``
    is set."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3.0).close()
        return True
    except OSError:
        return False


def configure_offline() -> None:
    """Switch the hub libraries to offline mode when the hub cannot be reached (else every
    lookup retries for half a minute)."""
    if hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Libraries imported before this call read the variables at import time.
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
