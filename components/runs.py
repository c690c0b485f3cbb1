"""A run's identity beside its outputs (``run.json``), and the one check made before resuming.

Three kinds of output folder are resumed, and each must refuse outputs of another run
rather than mix or replace them: sample.py's image folder (``--out``), an evaluation's
output folder (``results.csv``), and training's checkpoint folder (``last.ckpt``;
``callbacks/export.py``, which compares the artifact's manifest the same way). Each writes
what determines its outputs as a JSON mapping; a rerun compares it with its own:

    changes = identity_changes(recorded_identity(out), identity)   # "" when the same run
    check_identity(out, identity, in_use=bool(images), problem="...", fix="...")
    write_identity(out, identity)

A folder whose run.json exists but which holds no outputs yet is free (a run that failed
before writing anything); a damaged run.json is another run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from components.atomic import atomic_path
from components.errors import UserError

RUN_FILE = "run.json"
OPAQUE = {"concept": "other concept images"}  # a fingerprint: its values say nothing to a reader


def _json(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as read back from the file


def recorded_identity(folder: str | Path, file: str = RUN_FILE) -> dict | None:
    """The identity written in ``folder`` (None when there is none; ``{}`` when it is damaged)."""
    path = Path(folder) / file
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def identity_changes(recorded: dict | None, identity: dict, keys: Iterable[str] | None = None,
                     opaque: dict[str, str] | None = None) -> str:
    """What differs between a recorded identity and this run's, as one phrase
    (``"seed 0 there, 3 here, ..."``); ``""`` when they agree (or nothing is recorded).
    ``keys``: the keys compared (default: both identities' keys); an ``opaque`` key (a
    fingerprint) is named by its phrase, without its values (default: ``concept`` ->
    "other concept images")."""
    if recorded is None:
        return ""
    opaque = OPAQUE if opaque is None else opaque
    identity = _json(identity)
    keys = list(keys) if keys is not None else list(dict.fromkeys([*identity, *recorded]))
    differ = [k for k in keys if recorded.get(k) != identity.get(k)]
    return ", ".join(opaque[k] if k in opaque else f"{k} {recorded.get(k)!r} there, {identity.get(k)!r} here"
                     for k in differ)


def check_identity(folder: str | Path, identity: dict, *, in_use: bool, problem: str, fix: str,
                   keys: Iterable[str] | None = None) -> None:
    """A :class:`UserError` when ``folder`` holds outputs (``in_use``) of another run;
    ``problem`` may name the differences as ``{changes}``."""
    if not in_use:
        return
    changes = identity_changes(recorded_identity(folder), identity, keys)
    if changes:
        raise UserError(problem.format(changes=changes, folder=folder), fix=fix)


def write_identity(folder: str | Path, identity: dict, file: str = RUN_FILE) -> None:
    """Write the run's identity (atomically: a killed write leaves the old file or the new one)."""
    with atomic_path(Path(folder) / file) as tmp:
        tmp.write_text(json.dumps(identity, indent=2) + "\n")
