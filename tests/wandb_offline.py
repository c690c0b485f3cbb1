"""Read what an offline W&B run holds, without the network.

wandb >= 0.2x keeps no Python reader for its ``.wandb`` record log, so this reads the two
things the tests need directly: the history rows (the file is a LevelDB-style log of
protobuf ``Record``s, split into 32 KiB blocks; a record may span blocks) and the image
files the run saved under ``files/media/images``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def run_dir(root: str | Path) -> Path:
    runs = sorted(Path(root).rglob("offline-run-*"))
    assert runs, f"no offline W&B run under {root}"
    return runs[-1]


def history(run: Path) -> list[dict]:
    """The run's history rows, ``{key: value}``, in the order they were logged."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run.glob("run-*.wandb")).read_bytes()
    block, pos, buf, rows = 32768, 7, b"", []  # the file starts with a 7-byte header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])  # checksum, length, chunk type
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def metric_values(run: Path, key: str) -> list[float]:
    """Every value the history holds for ``key``, in order."""
    return [float(row[key]) for row in history(run) if key in row]


def images(run: Path, prefix: str = "") -> list[np.ndarray]:
    files = sorted((run / "files" / "media" / "images").rglob(f"{prefix}*.png"))
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]
