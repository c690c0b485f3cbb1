"""Run a training script and record when each of its optimizer steps ends.

    python benchmarks/steptimer.py MARKS.json SCRIPT.py [script arguments ...]

The same launcher runs diffusers' example scripts and this project's ``train.py`` in
``bench_vs_diffusers.py``, so both are timed by one clock and one rule: a global
optimizer-step hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) appends
(wall seconds, process CPU seconds) since this file started to MARKS.json's list. The
first mark is the time to the first training step (imports, model loading, data set-up,
the first step); intervals between later marks are step times.

``BENCH_THREADS`` (default 1) sets torch's intra-op threads for both sides alike.
"""

import time

T0_WALL, T0_CPU = time.perf_counter(), time.process_time()

import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, script = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    sys.argv = [str(script), *sys.argv[3:]]
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    marks: list[tuple[float, float]] = []

    def on_step(optimizer, args, kwargs) -> None:
        marks.append((time.perf_counter() - T0_WALL, time.process_time() - T0_CPU))

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(on_step)
    atexit.register(lambda: out.write_text(json.dumps(marks)))
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
