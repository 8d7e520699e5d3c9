"""Checkpoint files: written atomically, read with ``weights_only=True`` (tensors and plain
containers only: a file that would run code when unpickled is refused), every problem one line
naming the file."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError
from ..files import write_bytes


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely: tensors and plain containers only (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise TrainingError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        text = str(error)
        if "Weights only load failed" in text or "weights_only" in text:
            raise TrainingError(f"{path}: refused: the file holds Python objects beyond tensors "
                                f"(unsafe to unpickle)") from None
        first = text.splitlines()[0] if text else error.__class__.__name__
        raise TrainingError(f"{path}: not a readable checkpoint (truncated or damaged: {first[:120]})") from None
