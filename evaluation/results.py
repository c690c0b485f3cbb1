"""The results table of an evaluation: one CSV row per (subject, sampler, setting).

Each rank appends its finished cells to its own part file (``parts/rank<r>.csv``) as
soon as a cell is done, so a run that stops loses at most the cell in progress. A rerun
reads ``results.csv`` and every part file and skips the cells found there. At the end
rank 0 merges everything into ``results.csv`` (in the order of the plan) and removes
the part files.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from components.atomic import atomic_path
from components.linefile import complete_lines, damaged, drop_torn_tail

COLUMNS = [
    "subject", "sampler", "curve", "setting", "clip_i", "clip_t", "dino",
    "unet_evals_per_image", "max_unet_batch", "num_images", "seconds", "settings", "key", "identity", "prompt",
]
NUMERIC = ("clip_i", "clip_t", "dino", "unet_evals_per_image", "max_unet_batch", "num_images", "seconds", "identity",
           "prompt")
#: columns a row may lack (tables written before they existed, or runs without a MiniWorld judge)
OPTIONAL = ("identity", "prompt")


def cell_key(subject: str, sampler: str, settings_json: str) -> str:
    return f"{subject}|{sampler}|{settings_json}"


def _read_csv(path: Path) -> list[dict]:
    """The finished rows of a results file. An unfinished last line (a run killed or a disk
    full while appending) is dropped with a warning and its cell runs again; a damaged line
    elsewhere is a UserError naming the file and the line."""
    lines = complete_lines(path, what="cell")
    if not lines:
        return []
    header = next(csv.reader([lines[0][1]]))
    rows = []
    for number, line in lines[1:]:
        try:
            values = next(csv.reader([line]))
            if len(values) != len(header):
                raise ValueError(f"{len(values)} fields, the header has {len(header)}")
            row = dict(zip(header, values))
            if not row.get("key") or any(c not in row for c in COLUMNS if c not in OPTIONAL):
                raise ValueError("a column is missing")
            for c in NUMERIC:
                row[c] = float(row[c]) if row.get(c) not in (None, "", "nan") else math.nan
        except (ValueError, csv.Error) as err:
            raise damaged(path, number, err, what="cell") from err
        rows.append(row)
    return rows


class ResultStore:
    """``results.csv`` and the per-rank part files under one output folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / "results.csv"
        self.parts = self.folder / "parts"

    def rows(self) -> list[dict]:
        """Every finished row: the merged table, then the part files (later rows win)."""
        by_key: dict[str, dict] = {}
        for path in [self.path, *sorted(self.parts.glob("rank*.csv"))]:
            for row in _read_csv(path):
                by_key[row["key"]] = row
        return list(by_key.values())

    def done_keys(self) -> set[str]:
        return {row["key"] for row in self.rows()}

    def append(self, row: dict, rank: int = 0) -> None:
        """Write one finished cell to this rank's part file, flushed to disk."""
        self.parts.mkdir(parents=True, exist_ok=True)
        path = self.parts / f"rank{rank}.csv"
        drop_torn_tail(path)  # the row starts on a line of its own
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({c: row.get(c, "") for c in COLUMNS})
            f.flush()
            os.fsync(f.fileno())

    def merge(self, order: list[str] | None = None) -> list[dict]:
        """Write all rows to ``results.csv`` (plan order first, then any others) and drop the parts."""
        rows = self.rows()
        rank = {k: i for i, k in enumerate(order or [])}
        rows.sort(key=lambda r: rank.get(r["key"], len(rank)))
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({c: row.get(c, "") for c in COLUMNS})
        for part in self.parts.glob("rank*.csv"):
            part.unlink()
        if self.parts.is_dir() and not any(self.parts.iterdir()):
            self.parts.rmdir()
        return rows
