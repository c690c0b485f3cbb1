"""Exact resume from a mid-epoch checkpoint after a real crash: train.py is SIGKILLed
after a mid-epoch checkpoint, resumed with --ckpt_path, and every tensor of its final
artifact equals the one of an uninterrupted run (DreamBooth q/k/v; HiFi Tuner killed in
the middle of Algorithm 1's step-wise phase)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train

ROOT = Path(__file__).resolve().parents[1]

# demo concept: 5 images x 2 repeats, batch 2 -> 5 steps per epoch; random crops and flips
DATA = {"class_path": "datamodules.concept.ConceptDataModule",
        "init_args": {"concept_dir": "demo", "resolution": 32, "batch_size": 2, "repeats": 2,
                      "center_crop": False, "random_flip": True, "seed": 1}}
METHODS = {
    "dreambooth_qkv": ({"class_path": "lightning_modules.DreamBoothQKV",
                        "init_args": {"pretrained_model": "tiny", "learning_rate": 1e-3, "lr_warmup_steps": 2, "seed": 2}},
                       8, 3),  # 8 steps (2 epochs), killed at the start of step 3 (after the checkpoint at step 2)
    "hifi_tuner": ({"class_path": "lightning_modules.HiFiTextualInversion",
                    "init_args": {"pretrained_model": "tiny", "learning_rate": 1e-2, "masked_loss": False,
                                  "global_steps": 2, "num_ddim_steps": 3, "steps_per_timestep": 2, "seed": 2}},
                   8, 5),  # Algorithm 1: 2 global steps, then 3 DDIM steps x 2; killed inside DDIM step 1's phase
}


def write_config(tmp: Path, name: str, model: dict, max_steps: int, kill_at: int | None) -> Path:
    ckpt_dir = tmp / "checkpoints"
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(ckpt_dir), "save_last": True, "every_n_train_steps": 2}},
        {"class_path": "callbacks.ExportArtifact", "init_args": {"dirpath": str(tmp / "artifact")}},
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "kill_after.KillAtStep",
                          "init_args": {"step": kill_at, "checkpoint": str(ckpt_dir / f"epoch=0-step={kill_at - 1}.ckpt")}})
    config = {"seed_everything": 0, "model": model, "data": DATA, "trainer": {
        "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False, "enable_progress_bar": False,
        "enable_model_summary": False, "limit_val_batches": 0, "default_root_dir": str(tmp), "callbacks": callbacks}}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def artifact_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.rglob("*.safetensors")):
        tensors.update({f"{file.relative_to(folder)}:{k}": v for k, v in load_file(str(file)).items()})
    return tensors


@pytest.mark.parametrize("method", list(METHODS))
def test_sigkill_after_a_mid_epoch_checkpoint_then_resume_is_exact(tmp_path, method):
    model, max_steps, kill_at = METHODS[method]
    straight = write_config(tmp_path / "straight", "run", model, max_steps, None)
    train.main(["fit", "--config", str(straight)])

    crashed = tmp_path / "crashed"
    config = write_config(crashed, "run", model, max_steps, kill_at)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last = crashed / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == kill_at - 1 and (kill_at - 1) % 5 != 0  # mid-epoch
    assert not (crashed / "artifact").exists()

    resumed = write_config(crashed, "resume", model, max_steps, None)
    train.main(["fit", "--config", str(resumed), "--ckpt_path", str(last)])

    a, b = artifact_tensors(tmp_path / "straight" / "artifact"), artifact_tensors(crashed / "artifact")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
