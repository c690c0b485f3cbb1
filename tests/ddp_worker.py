"""Run by tests/test_ddp.py: train with DDP on 2 CPU processes (gloo) and write each rank's
trained parameters, so the test can check that both ranks end with the same weights."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from datamodules.concept import ConceptDataModule
from lightning_modules import DreamBoothQKV


class SaveWeights(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        state = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save({"state": state, "world_size": trainer.world_size, "step": trainer.global_step},
                   self.out / f"rank{trainer.global_rank}.pt")


def main(out: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = ConceptDataModule(concept_dir="demo", resolution=32, batch_size=1, random_flip=True, repeats=2)
    module = DreamBoothQKV(pretrained_model="tiny", superclass=dm.superclass, learning_rate=1e-3)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[SaveWeights(Path(out))])
    trainer.fit(module, dm)


if __name__ == "__main__":
    main(sys.argv[1])
