"""Files that grow one line per finished result (``manifest.jsonl``, evaluation part files).

A crash or a full disk in the middle of an append leaves a torn last line: no newline at
its end. Such a line is dropped with a warning (its result is computed again), and cut
off the file before the next append, so the next line never glues onto it. A line that
does not parse anywhere else is damage that no rerun repairs: a :class:`UserError`
naming the file and the line.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, TypeVar

from components.errors import UserError

T = TypeVar("T")


def complete_lines(path: str | os.PathLike, what: str = "record") -> list[tuple[int, str]]:
    """(line number, text) of every finished, non-empty line; an unfinished last line (no
    newline after it) is left out with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    finished, _, torn = path.read_text().rpartition("\n")
    if torn.strip():
        warnings.warn(f"{path}: dropped its unfinished last line (a run stopped while writing it); "
                      f"that {what} is made again.", stacklevel=3)
    lines = finished.split("\n") if finished else []
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def damaged(path: str | os.PathLike, number: int, err: Exception, what: str = "record") -> UserError:
    return UserError(f"{path}, line {number} is damaged ({type(err).__name__}: {err})",
                     fix=f"delete that line (its {what} is then made again), or delete the file to start over")


def read_lines(path: str | os.PathLike, parse: Callable[[str], T], what: str = "record") -> list[T]:
    """``parse`` of every finished line; a line that does not parse is a :class:`UserError`
    naming the file and the line."""
    out = []
    for number, line in complete_lines(path, what):
        try:
            out.append(parse(line))
        except Exception as err:  # noqa: BLE001 - whatever the parser raises, the line is damaged
            raise damaged(path, number, err, what) from err
    return out


def drop_torn_tail(path: str | os.PathLike) -> None:
    """Cut an unfinished last line (no newline) off ``path``, so appends start on a new line."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)  # 0 when the only line is torn
