"""Write the method's artifact (only what it trained) when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class ExportArtifact(L.Callback):
    """Save ``pl_module.save_artifact`` at the end of ``fit`` (rank 0).

    Args:
        dirpath: where to write; default ``<log dir>/artifact`` (or
            ``<default_root_dir>/artifact`` without a logger).
        every_n_epochs: also export after every n-th training epoch (0: only at the end).
    """

    def __init__(self, dirpath: str | None = None, every_n_epochs: int = 0):
        self.dirpath, self.every_n_epochs = dirpath, every_n_epochs

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        base = trainer.log_dir or trainer.default_root_dir
        return Path(base) / "artifact"

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # the same on every rank
            rank_zero_warn(f"No optimizer step was taken: the artifact is not written ({self.resolve_dir(trainer)} is "
                           "left as it was). Train at least one step (max_steps, max_epochs, repeats >= 1).")
            return
        if trainer.is_global_zero:
            folder = pl_module.save_artifact(self.resolve_dir(trainer))
            rank_zero_info(f"Artifact written to {folder}")
        trainer.strategy.barrier("export_artifact")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._export(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module)
