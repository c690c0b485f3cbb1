"""Write the method's artifact (only what it trained) when training ends.

The artifact records which run made it (``personalize.json``'s ``run``: the method, the
base model, placeholder, superclass and a fingerprint of the concept images). Before
training starts, a folder holding the artifact of another run is refused (its trained
weights would be replaced); the same run re-run or resumed may replace its own artifact.
The same holds for the checkpoints: the run's identity is written beside them
(``run.json`` in each ModelCheckpoint folder) when it starts, and checkpoints of another
run (one killed before its artifact was written) are refused too. ``overwrite=True``
(``train.py --overwrite_artifact true``) replaces another run's artifact and checkpoints
deliberately. A folder that holds something other than an artifact is never replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from components.errors import UserError
from components.runs import identity_changes, recorded_identity, write_identity

ARTIFACT_MANIFEST = "personalize.json"
#: what makes two runs "the same run" (a difference anywhere else, e.g. the learning rate
#: or the number of steps, is the same experiment run again)
IDENTITY_KEYS = ("method", "pretrained_model", "placeholder", "superclass", "concept")


def run_identity(trainer: L.Trainer, pl_module: L.LightningModule, datamodule=None) -> dict:
    """What this run's artifact is: method, base model, placeholder, superclass and a
    fingerprint of the concept images (the DataModule's ``fingerprint()``, if it has one)."""
    hparams = getattr(pl_module, "hparams", {})
    identity = {
        "method": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
        "pretrained_model": hparams.get("pretrained_model"),
        "placeholder": getattr(pl_module, "placeholder", hparams.get("placeholder")),
        "superclass": getattr(pl_module, "superclass", hparams.get("superclass")),
        "concept": None,
    }
    fingerprint = getattr(datamodule or getattr(trainer, "datamodule", None), "fingerprint", None)
    if callable(fingerprint):
        identity["concept"] = fingerprint()
    return identity


def artifact_conflict(folder: Path, identity: dict) -> tuple[str, str, bool] | None:
    """Why writing this run's artifact into ``folder`` would replace what is not its own:
    (problem, fix, whether ``overwrite`` may replace it), or None when the folder is free or
    holds this run's artifact. A folder that is not an artifact is never replaced."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return None
    manifest = folder / ARTIFACT_MANIFEST
    if not folder.is_dir() or not manifest.is_file():
        return (f"the artifact folder {folder} exists and holds no artifact ({ARTIFACT_MANIFEST} missing): writing the "
                "artifact would replace it", "give the run another folder: --trainer.default_root_dir outputs/<new name> "
                "(or ExportArtifact's dirpath)", False)
    try:
        written = json.loads(manifest.read_text())
        # an artifact saved outside ExportArtifact (module.save_artifact) records no run:
        # it is compared on what its manifest names (method, base model, placeholder, superclass)
        recorded, keys = (written["run"], IDENTITY_KEYS) if isinstance(written.get("run"), dict) else \
            (written, IDENTITY_KEYS[:-1])
    except (OSError, ValueError, AttributeError):
        recorded, keys = {}, IDENTITY_KEYS  # a damaged manifest: not this run's
    what = identity_changes(recorded, identity, keys)
    if not what:
        return None
    return (f"{folder} holds the artifact of another run ({what}); this run would replace its trained weights",
            _FIX, True)


_FIX = ("give this run its own folder: --trainer.default_root_dir outputs/<new name>; or replace that run's outputs "
        "deliberately: --overwrite_artifact true (ExportArtifact(overwrite=True))")


def checkpoint_conflict(folder: Path, identity: dict) -> tuple[str, str, bool] | None:
    """Checkpoints of another run in ``folder`` (its ``run.json``, written when that run
    started, names it): a run killed before its artifact was written keeps its last.ckpt."""
    if not folder.is_dir() or not any(folder.glob("*.ckpt")):
        return None
    what = identity_changes(recorded_identity(folder), identity, IDENTITY_KEYS)
    if not what:
        return None
    return (f"{folder} holds the checkpoints of another run ({what}); this run would replace its last.ckpt", _FIX,
            True)


class ExportArtifact(L.Callback):
    """Save ``pl_module.save_artifact`` at the end of ``fit`` (rank 0).

    Args:
        dirpath: where to write; default ``<log dir>/artifact`` (or
            ``<default_root_dir>/artifact`` without a logger; train.py's W&B logger
            writes to ``trainer.default_root_dir``, so ``<default_root_dir>/artifact``).
        every_n_epochs: also export after every n-th training epoch (0: only at the end).
        overwrite: replace an artifact of another run in ``dirpath`` (without it, such a
            run stops before training with one message). The same run (same method, base
            model, placeholder, superclass and concept images), re-run or resumed, always
            replaces its own artifact.
    """

    def __init__(self, dirpath: str | None = None, every_n_epochs: int = 0, overwrite: bool = False):
        self.dirpath, self.every_n_epochs, self.overwrite = dirpath, every_n_epochs, overwrite
        self._identity: dict | None = None
        self._checkpoint_dirs: list[Path] = []

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        base = trainer.log_dir or trainer.default_root_dir
        return Path(base) / "artifact"

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, datamodule=None) -> None:
        """Refuse a run whose artifact would replace another run's (a UserError). train.py
        calls it before ``fit`` starts (before the logger starts a run); :meth:`setup`
        calls it where nothing has (the Python API), on every rank (rank 0 looks, the
        ranks agree)."""
        folder = self.resolve_dir(trainer)  # trainer.log_dir is a collective: every rank
        self._identity = identity = run_identity(trainer, pl_module, datamodule)
        checkpoints = [Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        conflict = None
        if trainer.is_global_zero:
            conflict = artifact_conflict(folder, identity)
            for ckpt_dir in checkpoints:
                conflict = conflict or checkpoint_conflict(ckpt_dir, identity)
        conflict = trainer.strategy.broadcast(conflict)
        if conflict is not None:
            problem, fix, replaceable = conflict
            if not (self.overwrite and replaceable):
                raise UserError(problem, fix=fix)
            rank_zero_warn(f"overwrite: {problem}; replacing it as asked.")
        self._checkpoint_dirs = checkpoints  # marked as this run's when training starts

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before the model loads and trains; train.py has checked already (before_fit)
        if stage == "fit" and self._identity is None:
            self.check(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # this run's checkpoints, from now on: written after ModelCheckpoint's own setup, so
        # that a fresh run's folder is still empty there (no "exists and is not empty" warning)
        if trainer.is_global_zero and self._identity is not None:
            for ckpt_dir in self._checkpoint_dirs:
                write_identity(ckpt_dir, self._identity)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # the same on every rank
            rank_zero_warn(f"No optimizer step was taken: the artifact is not written ({self.resolve_dir(trainer)} is "
                           "left as it was). Train at least one step (max_steps, max_epochs, repeats >= 1).")
            return
        folder = self.resolve_dir(trainer)
        if trainer.is_global_zero:
            identity = self._identity or run_identity(trainer, pl_module)
            conflict = artifact_conflict(folder, identity)
            if conflict is not None and not (self.overwrite and conflict[2]):  # appeared while training
                rank_zero_warn(f"Artifact not written: {conflict[0]}. Fix: {conflict[1]}.")
            else:
                folder = pl_module.save_artifact(folder, run=identity)
                rank_zero_info(f"Artifact written to {folder}")
        trainer.strategy.barrier("export_artifact")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._export(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module)
        self._identity = None  # a later fit with this callback is checked again

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._identity = None
