"""DDP on 2 CPU processes (gloo): both ranks end with the same weights, which moved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import build
from lightning_modules import DreamBoothQKV


def test_two_process_ddp_ranks_agree(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}:{root / 'tests'}", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(root / "tests" / "ddp_worker.py"), str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["step"] == r1["step"] == 3
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # and training did something: the weights differ from the base model's
    base = dict(build(DreamBoothQKV, pretrained_model="tiny", superclass="ball").named_parameters())
    assert any(not torch.equal(base[k], v) for k, v in r0["state"].items())
