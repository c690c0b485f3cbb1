"""One "write beside, then rename into place" helper (components.atomic.atomic_path) used for
every cache and output written that way, and one list of image suffixes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.atomic import atomic_path

ROOT = Path(__file__).resolve().parents[1]


def test_file_is_replaced_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "run.json"
    with atomic_path(target) as tmp:
        tmp.write_text("one")
        assert not target.exists() and tmp.parent == target.parent  # invisible until the block ends
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "one" and os.listdir(target.parent) == ["run.json"]  # nothing left behind
    with atomic_path(target) as tmp:
        tmp.write_text("two")
    assert target.read_text() == "two"


def test_folder_cache_first_builder_wins_and_artifact_replaces(tmp_path):
    folder = tmp_path / "cache"
    with atomic_path(folder, replace=False) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("first")
    with atomic_path(folder, replace=False) as tmp:  # a second builder: the first one's folder stays
        tmp.mkdir()
        (tmp / "a").write_text("second")
    assert (folder / "a").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["cache"]
    with atomic_path(folder) as tmp:  # replace=True (artifacts): the new folder, the old one gone
        tmp.mkdir()
        (tmp / "b").write_text("new")
    assert os.listdir(folder) == ["b"] and sorted(os.listdir(tmp_path)) == ["cache"]
    with pytest.raises(ValueError), atomic_path(folder) as tmp:
        tmp.mkdir()
        raise ValueError
    assert os.listdir(folder) == ["b"] and sorted(os.listdir(tmp_path)) == ["cache"]


def test_a_block_that_writes_nothing_or_a_failed_rename_is_an_error(tmp_path, monkeypatch):
    """Writing nothing names the target (was os.replace's FileNotFoundError about a hidden
    temporary); a folder rename that fails while no other builder's folder is there raises
    (it was taken for a lost race and the target silently never written)."""
    target = tmp_path / "run.json"
    target.write_text("old")
    with pytest.raises(FileNotFoundError, match="wrote nothing.*run.json"), atomic_path(target):
        pass
    assert target.read_text() == "old"
    folder = tmp_path / "cache"

    def fail(self, other):
        raise OSError("disk gone")

    monkeypatch.setattr(Path, "rename", fail)
    with pytest.raises(OSError, match="disk gone"), atomic_path(folder, replace=False) as tmp:
        tmp.mkdir()
    assert sorted(os.listdir(tmp_path)) == ["run.json"]  # no temporary left behind
    folder.mkdir()  # another process built it first: its rename fails, and that is no error
    with atomic_path(folder, replace=False) as tmp:
        tmp.mkdir()
    assert sorted(os.listdir(tmp_path)) == ["cache", "run.json"]


def test_no_hand_written_temp_then_rename_left():
    """Every 'write a .tmp, then rename/replace it' goes through atomic_path."""
    pattern = re.compile(r"\.tmp|\.rename\(|os\.replace\(|\btmp\.replace\(")
    found = []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        if rel.parts[0] in (".venv", "tests") or rel == Path("components/atomic.py"):
            continue
        found += [f"{rel}:{i}" for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


def test_one_list_of_image_suffixes(tmp_path):
    from components.pixels import IMAGE_SUFFIXES
    from datamodules import concept
    from metrics import reference

    assert concept.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    assert not hasattr(reference, "IMAGE_SUFFIXES") or reference.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i:02d}{suffix.upper()}")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "00_mask.png")
    (tmp_path / "notes.txt").write_text("not an image")
    expected = [f"{i:02d}{s.upper()}" for i, s in enumerate(IMAGE_SUFFIXES)]
    assert [p.name for p in reference.image_files(tmp_path)] == expected  # the metrics' reference images
    assert [p.name for p in concept._list_images(tmp_path)] == expected  # the concept DataModule's
