"""A callback for tests/test_resume.py: SIGKILL this very process at the start of a step,
once the checkpoint written before it exists (a crash, with no chance to clean up)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int, checkpoint: str):
        self.step, self.checkpoint = step, checkpoint

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and Path(self.checkpoint).exists():
            os.kill(os.getpid(), signal.SIGKILL)
