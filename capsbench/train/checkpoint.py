"""Checkpoints: plain state dicts written atomically, loaded with ``weights_only=True``."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from capsbench.core import atomic
from capsbench.core.errors import CapsbenchError


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, dicts, lists, numbers, strings) to ``path`` atomically."""
    atomic.write_with(path, lambda tmp: torch.save(state, tmp))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; a corrupt or tampered file is a clear error."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CapsbenchError(f"checkpoint {path} does not exist") from None
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CapsbenchError(f"checkpoint {path} is corrupt or not a capsbench checkpoint ({first}); delete it to retrain") from None
    if not isinstance(state, dict):
        raise CapsbenchError(f"checkpoint {path} is not a capsbench checkpoint (no state dict); delete it to retrain")
    return state


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["cpu"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
