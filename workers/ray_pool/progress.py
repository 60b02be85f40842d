"""Progress and checkpoint files of a data-parallel training run (rank 0 writes, the coordinator reads)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from specdit.atomic import atomic_write_text


def write_progress(out_dir: Path, row: dict) -> None:
    """``out_dir/progress.json``: the latest loss-log row and the time it was written (atomically)."""
    atomic_write_text(Path(out_dir) / "progress.json", json.dumps({**row, "time": time.time()}))


def read_progress(out_dir: str | Path) -> dict | None:
    """The latest progress row, or None if there is none (yet) or it cannot be read."""
    try:
        return json.loads((Path(out_dir) / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def checkpoint_step(out_dir: str | Path) -> int:
    """The step of the checkpoint in ``out_dir`` (0 if none)."""
    import torch

    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
