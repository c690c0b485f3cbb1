"""Write a file or folder under a temporary name beside it, then rename it into place.

Readers (another rank, a concurrent process, a rerun after a crash) see either nothing or
the whole thing, never half of it. One helper for every cache and output written this way:
the tiny presets and backbones, the demo and MiniWorld concept folders, the world render,
reference embeddings, prior class images, artifacts, run identities and result tables.

    with atomic_path(folder, replace=False) as tmp:   # a cache: the first builder wins
        components.save_pretrained(tmp)
    with atomic_path(path) as tmp:                    # a file: replaced when complete
        tmp.write_text(text)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (hidden, named per process) to write a file or
    a folder to; when the block ends without error it becomes ``target``.

    A file replaces what is there (``os.replace``). A folder replaces an existing folder when
    ``replace`` (the old one is moved aside first, then deleted); with ``replace=False`` a
    folder already there wins (another process built it first) and the temporary one is
    deleted. On an error the temporary path is deleted and the error raised. The parent
    folder is created. The temporary name has no image or archive suffix, so writers that
    pick a format from the suffix need it given (``format="PNG"``, a file object)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    _remove(tmp)  # left by a crashed run of this pid
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not (tmp.exists() or tmp.is_symlink()):
        raise FileNotFoundError(f"atomic_path: the block wrote nothing to {tmp}, so {target} was not written")
    if not tmp.is_dir():
        os.replace(tmp, target)
        return
    if target.exists() and replace:
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        _remove(old)
        target.rename(old)
        tmp.rename(target)
        _remove(old)
        return
    try:
        tmp.rename(target)  # atomic: concurrent builders never see a half-written folder
    except OSError:
        _remove(tmp)
        if not target.is_dir():  # not another process winning the race: a real failure
            raise
