"""Run by tests/test_ddp.py: train every method under plain ``ddp`` on 2 CPU processes
(gloo) and write each rank's trained parameters, so the test can check that both ranks
end with the same weights. One launch for all methods: Lightning starts the second
process at the first ``fit`` and both processes then run the same sequence of fits."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from datamodules.concept import ConceptDataModule
from lightning_modules import (BOFT, OFT, CustomDiffusion, DreamBooth, DreamBoothQKV, HiFiTextualInversion, LoRA, SVDiff,
                               TextualInversion)

# every method (as in tests/test_methods.py), 3 steps each; HiFi crosses from the global
# phase into two step-wise phases, so a different embedding trains at each step
METHODS = {
    "dreambooth": (DreamBooth, {}),
    "dreambooth_qkv": (DreamBoothQKV, {}),
    "textual_inversion": (TextualInversion, {"placeholder": "<ball1>", "num_vectors": 2}),
    "custom_diffusion": (CustomDiffusion, {"placeholder": "<new1>"}),
    "svdiff": (SVDiff, {}),
    "lora": (LoRA, {"train_text_encoder": True, "text_rank": 2}),
    "oft": (OFT, {"block_size": 8}),
    "boft": (BOFT, {"num_blocks": 4, "train_text_encoder": True}),
    "hifi": (HiFiTextualInversion, {"global_steps": 1, "num_ddim_steps": 2, "steps_per_timestep": 1, "masked_loss": False}),
}
MAX_STEPS = 3


class SaveWeights(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        state = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save({"state": state, "world_size": trainer.world_size, "step": trainer.global_step},
                   self.out / f"rank{trainer.global_rank}.pt")


def main(out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    for name in names:
        cls, kwargs = METHODS[name]
        L.seed_everything(0)
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        dm = ConceptDataModule(concept_dir="demo", resolution=32, batch_size=1, random_flip=True, repeats=2)
        module = cls(**{"pretrained_model": "tiny", "superclass": dm.superclass, "learning_rate": 1e-3, **kwargs})
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=MAX_STEPS, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[SaveWeights(folder)])
        trainer.fit(module, dm)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(METHODS))
