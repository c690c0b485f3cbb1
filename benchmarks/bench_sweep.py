"""A sweep sampled with the planner (shared prefixes, packed UNet batches) against today's
one-setting-at-a-time loop: UNet evaluations planned vs naive, wall time, equal images.

    python benchmarks/bench_sweep.py                                    # both configs, MiniWorld model, CPU
    python benchmarks/bench_sweep.py --config configs/eval/sampling_study.yaml --num-prompts 25 --num-images 10 \\
        --device cuda --dtype bfloat16 --unet-batch 64                  # the study's full size on a GPU (+ MFU)

For each sweep config (an evaluation YAML: ``sweep`` + ``defaults``, or a MiniWorld study
YAML: ``sweep`` + ``evaluation``), the first ``--num-prompts`` MiniWorld prompts ×
``--num-images`` images are sampled with every setting of the sweep twice: each setting
alone (``Sampler.sample_cells``, batches of ``--batch-size`` images: what evaluate.py did
before the planner) and all settings together through ``evaluation.planner.SweepPlanner``
(the same cell batches, UNet calls of ``--unet-batch`` rows). It prints the UNet rows of
both, the wall time of both (repeats interleaved, min and median), and the largest image
difference. Metrics are not computed (the same in both). ``--device cuda`` also prints the
MFU of both from the UNet's counted FLOPs (benchmarks/flops.py).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.flops import mfu_line, unet_flops_per_row  # noqa: E402
from components.loader import load_components  # noqa: E402
from components.personalized import BaseModel  # noqa: E402
from evaluation.planner import SweepPlanner  # noqa: E402
from evaluation.sweep import expand_sweep  # noqa: E402

CONFIGS = ["configs/eval/sampling_study.yaml", "configs/miniworld/study.yaml"]


def sweep_of(path: str) -> tuple[list, dict, int]:
    """(sweep points, defaults, batch size of the config) of an eval or MiniWorld study YAML."""
    cfg = yaml.safe_load(Path(path).read_text())
    ev = cfg.get("evaluation", cfg)
    defaults = ev.get("defaults", {})
    return expand_sweep(cfg["sweep"], defaults), defaults, int(ev.get("batch_size", 8))


def prompts(n: int) -> list[str]:
    from miniworld.concepts import PROMPTS

    return list(PROMPTS)[:n]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=CONFIGS, help="sweep configs (eval YAML or MiniWorld study YAML)")
    p.add_argument("--model", default="miniworld/pretrained/sd", help="model folder / hub id (default: MiniWorld)")
    p.add_argument("--superclass", default="ball")
    p.add_argument("--num-prompts", type=int, default=2, help="prompts of the sweep (the study: 25)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (the study: 10)")
    p.add_argument("--batch-size", type=int, default=None, help="cells per sampler run [the config's batch_size]")
    p.add_argument("--unet-batch", type=int, default=32, help="rows per planned UNet call")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each (interleaved)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU line, if not known")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    components = load_components(args.model, torch_dtype=None if dtype == torch.float32 else dtype)
    for module in components.modules().values():
        module.to(device)
    model = BaseModel(components, superclass=args.superclass)
    flops_row = unet_flops_per_row(components.unet, components.tokenizer.model_max_length)
    templates = prompts(args.num_prompts)
    cells = [(t, i) for t in templates for i in range(args.num_images)]
    print(f"# {args.model} on {device} ({args.dtype}), {len(templates)} prompts x {args.num_images} images; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for path in args.config:
        points, defaults, batch = sweep_of(path)
        batch = args.batch_size or batch
        samplers = [pt.build() for pt in points]

        def naive():
            return [s.sample_cells(model, cells, seed=0, batch_size=batch) for s in samplers]

        def planned():
            planner = SweepPlanner(unet_batch=args.unet_batch)
            return planner.sample(model, [(s, cells) for s in samplers], seed=0, batch_size=batch), planner.stats

        times = {"naive": [], "planned": []}
        for _ in range(args.repeats):  # interleaved, so slow phases of a shared machine hit both
            for name, fn in (("naive", naive), ("planned", planned)):
                sync(device)
                t0 = time.perf_counter()
                result = fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
                if name == "naive":
                    ref = result
                else:
                    out, stats = result
        naive_rows = sum(o.cost["unet_evals_per_image"] * len(o.images) for o in ref)
        diff = max(float((a.images - b.images).abs().max()) for a, b in zip(ref, out))
        t_n, t_p = min(times["naive"]), min(times["planned"])
        print(f"\n## {path}: {len(points)} settings, {len(cells)} cells, cell batch {batch}, UNet batch {args.unet_batch}")
        print(f"UNet rows: naive {naive_rows:.0f}, planned {stats.rows} ({naive_rows / stats.rows:.2f}x fewer; "
              f"{stats.calls} calls, {stats.rows / stats.calls:.1f} rows per call)")
        print(f"wall s: naive min {t_n:.2f} median {statistics.median(times['naive']):.2f}; planned min {t_p:.2f} "
              f"median {statistics.median(times['planned']):.2f} -> {t_n / t_p:.2f}x faster (min), "
              f"{len(times['naive'])} repeat(s)")
        print(f"largest image difference planned vs naive: {diff:.2e}")
        if device.type == "cuda":
            print(f"MFU naive:   {mfu_line(flops_row * naive_rows, t_n, device, dtype, args.peak_tflops)}")
            print(f"MFU planned: {mfu_line(flops_row * stats.rows, t_p, device, dtype, args.peak_tflops)}")


if __name__ == "__main__":
    main()
