"""Read what an offline W&B run holds, without the network.

wandb >= 0.2x keeps no Python reader for its ``.wandb`` record log, so this reads the two
things the tests need directly: the history values of a metric (each history item is a
protobuf message ``key`` + ``value_json``; the key is followed by the value's field tag
and length) and the image files the run saved under ``files/media/images``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image


def run_dir(root: str | Path) -> Path:
    runs = sorted(Path(root).rglob("offline-run-*"))
    assert runs, f"no offline W&B run under {root}"
    return runs[-1]


def metric_values(run: Path, key: str) -> list[float]:
    data = next(run.glob("run-*.wandb")).read_bytes()
    pattern = re.escape(key.encode()) + rb"\x82\x01.(-?[0-9.]+(?:[eE][-+]?[0-9]+)?|NaN)"
    return [float(v) for v in re.findall(pattern, data, flags=re.DOTALL)]


def images(run: Path, prefix: str = "") -> list[np.ndarray]:
    files = sorted((run / "files" / "media" / "images").rglob(f"{prefix}*.png"))
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]
