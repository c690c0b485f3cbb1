"""Metric throughput next to sampling throughput: what evaluation costs relative to sampling.

    python benchmarks/bench_metrics.py                         # tiny preset, tiny backbones, CPU
    python benchmarks/bench_metrics.py --backbones full        # CLIP ViT-B/32 + DINO ViT-S/16 sizes (random weights)
    python benchmarks/bench_metrics.py --device cuda --backbones full --model stabilityai/stable-diffusion-2-base

Sampling: ``--sampler`` (default mixed, 3 UNet branches) for ``--num-steps`` DDIM steps on
``--model``. Metrics: CLIP-I + CLIP-T + DINO on the sampled images (the real-image
embeddings are cached, as in evaluation, and timed apart). Prints images/s of each and
the share of evaluation time spent in the metrics.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls (after one warm-up call)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--model", default="tiny", help="base model sampled: 'tiny', a diffusers folder or hub id")
    p.add_argument("--backbones", choices=["tiny", "full"], default="tiny",
                   help="metric backbones: tiny random ones, or full-size architectures (ViT-B/32 CLIP, ViT-S/16 DINO) with random weights")
    p.add_argument("--clip", help="CLIP hub id or folder (overrides --backbones)")
    p.add_argument("--dino", help="DINO hub id or folder (overrides --backbones)")
    p.add_argument("--sampler", default="mixed")
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--num-images", type=int, default=16, help="images sampled and scored per timing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of model and backbones")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from components.loader import load_components
    from components.personalized import BaseModel
    from metrics import ConceptMetrics, load_clip_backbone, load_dino_backbone, tiny_backbone_folder
    from samplers import build_sampler

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    full = args.backbones == "full"
    clip_src = args.clip or tiny_backbone_folder("clip", full_size=full)
    dino_src = args.dino or tiny_backbone_folder("dino", full_size=full)

    model = BaseModel(load_components(args.model).to(device, dtype), superclass="dog")
    sampler = build_sampler(args.sampler, num_steps=args.num_steps)
    templates = ["a {} on the beach", "a {} in the snow", "a red {}", "a {} with a city in the background"]
    per_template = max(1, args.num_images // len(templates))

    def sample():
        return sampler.sample(model, templates, num_images=per_template, seed=0, batch_size=args.batch_size)

    t_sample, out = timed(sample, device, args.repeats)
    n = len(out.images)

    clip = load_clip_backbone(clip_src, torch_dtype=dtype).to(device)
    dino = load_dino_backbone(dino_src, torch_dtype=dtype).to(device)
    metrics = ConceptMetrics(clip_backbone=clip, dino_backbone=dino, sync_on_compute=False).to(device)
    real = torch.rand(5, 3, 512, 512)  # 5 real photos at 512 px, like a DreamBooth subject
    _sync(device)
    t = time.perf_counter()
    metrics.set_concept(real, "dog")
    _sync(device)
    t_reference = time.perf_counter() - t

    def score():
        metrics.reset()
        metrics.update(out.images, out.templates)
        return metrics.compute()

    t_metrics, values = timed(score, device, args.repeats)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model: {args.model} ({out.images.shape[-1]} px); backbones: {args.backbones}; dtype: {args.dtype}")
    print(f"{'stage':<44} {'seconds':>9} {'images/s':>10}")
    print(f"{f'sampling ({args.sampler}, {args.num_steps} steps, {n} images)':<44} {t_sample:>9.3f} {n / t_sample:>10.2f}")
    print(f"{'metrics (CLIP-I + CLIP-T + DINO)':<44} {t_metrics:>9.3f} {n / t_metrics:>10.2f}")
    print(f"{'real-image embeddings (5 x 512 px, once per concept)':<44} {t_reference:>9.3f}")
    print(f"metrics / sampling time: {t_metrics / t_sample:.4f}; "
          f"share of evaluation time in metrics: {100 * t_metrics / (t_metrics + t_sample):.2f} %")
    print(f"UNet evaluations per image: {out.cost['unet_evals_per_image']:.0f}; values: "
          + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))


if __name__ == "__main__":
    main()
