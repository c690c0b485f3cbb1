"""The instrument of benchmarks/bench_vs_diffusers.py: steptimer.py stamps every optimizer
step of any script it runs (diffusers' example scripts and train.py alike)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_steptimer_stamps_every_optimizer_step_of_a_script(tmp_path):
    script = tmp_path / "train_something.py"
    script.write_text(
        "import sys, torch\n"
        "assert sys.argv[1:] == ['--steps', '4'], sys.argv\n"
        "w = torch.nn.Parameter(torch.zeros(3))\n"
        "opt = torch.optim.AdamW([w], lr=0.1)\n"
        "sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    (w - 1).square().sum().backward(); opt.step(); opt.zero_grad()\n"
        "sgd.step()\n"
        "sys.exit(0)\n")
    marks = tmp_path / "marks.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "steptimer.py"), str(marks), str(script),
                           "--steps", "4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stamps = json.loads(marks.read_text())
    assert len(stamps) == 5  # 4 AdamW steps + 1 SGD step, whichever optimizer
    walls = [w for w, _ in stamps]
    assert walls == sorted(walls) and walls[0] > 0
    assert all(c >= 0 for _, c in stamps)


def test_ceiling_times_the_denoiser_alone_and_the_whole_step():
    """bench_vs_diffusers.py --ceiling's measurement on the tiny preset and the demo concept:
    the denoiser forward + backward alone and the whole step without Lightning, both in CPU
    seconds, for a method training UNet adapters and one training a token (whose
    conditioning requires grad)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_vs_diffusers", ROOT / "benchmarks" / "bench_vs_diffusers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for method in ("lora", "textual_inversion"):
        res = bench.denoiser_time(method, "tiny", "demo", "ball", resolution=32, batch_size=2, warmup=1, steps=2)
        assert set(res) == {"denoiser", "step"}
        assert all(isinstance(v, float) and v > 0 for v in res.values()), res
    assert torch.get_num_threads() == 1  # the measurement leaves the thread count alone
