"""Every method trains under plain DDP on 2 CPU processes (gloo): both ranks end with the
same weights, which moved. Plain ``ddp`` refuses a trainable parameter that gets no
gradient at a step, so this also proves that each method uses all it trains at every step
(HiFi Tuner: its global and step-wise embeddings are one parameter indexed by step)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build
from ddp_worker import MAX_STEPS, METHODS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(out)], cwd=out, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", list(METHODS))
def test_two_process_ddp_ranks_agree(ddp_runs, name):
    r0, r1 = (torch.load(ddp_runs / name / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["step"] == r1["step"] == MAX_STEPS
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # and training did something: the weights differ from the base model's
    cls, kwargs = METHODS[name]
    base = dict(build(cls, pretrained_model="tiny", superclass="ball", **kwargs).named_parameters())
    assert any(not torch.equal(base[k], v) for k, v in r0["state"].items())
