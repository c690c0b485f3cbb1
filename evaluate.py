"""Evaluate a base model or a trained artifact on the DreamBooth protocol, over sampler settings.

    # the mixed-sampling Pareto sweep of a trained artifact per subject
    python evaluate.py --config configs/eval/mixed_sweep.yaml \\
        --artifact 'outputs/{subject}/artifact' --dreambooth-root ../shared/dreambooth --subjects dog cat

    # one sampler setting, base model, a custom concept folder
    python evaluate.py --model stabilityai/stable-diffusion-2-base --concept-dir my_dog --superclass dog \\
        --sampler mixed --set guidance_concept=3.5 --set guidance_superclass=3.5

    # CPU smoke run: tiny model, tiny backbones, the synthetic demo concept
    python evaluate.py --config configs/eval/quickstart.yaml

    # 4 GPUs (Lightning Fabric DDP): each rank takes its share of the cells
    python evaluate.py --config configs/eval/mixed_sweep.yaml --devices 4

    # a MiniWorld concept, with the world's ground truth (judge identity / prompt accuracy)
    python -m miniworld write-concept orange_checkered_ball concepts/ball
    python evaluate.py --model miniworld/pretrained/sd --concept-dir concepts/ball --superclass ball \
        --clip miniworld/pretrained/clip --dino miniworld/pretrained/dino --judge miniworld/pretrained/judge

Writes to ``--output``: results.csv (subject, sampler, setting, CLIP-I, CLIP-T, DINO, UNet
evaluations per image; with --judge also identity and prompt accuracy), summary.csv (mean over subjects, Pareto flags), pareto.png and
pareto_dino.png, grids/ (rows prompts, columns images). Rerunning the same command skips
the cells already in results.csv. A mistake is one short message naming the fix; ``--debug``
(or ``PERSONALIZE_DEBUG=1``) shows its traceback.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

import yaml


def parse_args(argv=None) -> argparse.Namespace:
    from evaluation import EvalConfig

    d = EvalConfig()  # defaults shown in [brackets]
    p = argparse.ArgumentParser(
        description="CLIP-I / CLIP-T / DINO evaluation of personalized models over sampler settings\n"
        "(DreamBooth protocol: 25 prompts x N images per subject). A flag overrides the --config\n"
        "key of the same name; unset ones keep the config's value, else the default in [brackets].",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML of EvalConfig keys (see configs/eval/)")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="base model: diffusers folder, hub id or 'tiny' (with --artifact: overrides its base)")
    m.add_argument("--artifact", help="trained artifact folder; '{subject}' in it becomes each subject's name")
    s = p.add_argument_group("subjects and prompts")
    s.add_argument("--dreambooth-root", help="DreamBooth-layout root: one folder per subject + prompts_and_classes.txt")
    s.add_argument("--subjects", nargs="+", help="subject names under --dreambooth-root (default: all)")
    s.add_argument("--concept-dir", help="a single concept's image folder instead ('demo': the synthetic demo concept; 'miniworld:<concept>': a MiniWorld concept, with its prompts.txt)")
    s.add_argument("--superclass", help="class word of --concept-dir")
    s.add_argument("--prompts", help=f"'auto' (DreamBooth set of the class), 'object', 'live', or a file of templates [{d.prompts}]")
    s.add_argument("--num-prompts", type=int, help=f"keep the first N prompts (0: all 25) [{d.num_prompts}]")
    s.add_argument("--num-images", type=int, help=f"images per prompt (the study uses 10) [{d.num_images}]")
    s.add_argument("--seed", type=int, help=f"base seed of the per-(prompt, image) latents [{d.seed}]")
    w = p.add_argument_group("samplers")
    w.add_argument("--sweep", help="YAML sweep: a list of entries, or a mapping with a 'sweep' key")
    w.add_argument("--sampler", help=f"evaluate this one sampler (replaces the sweep); settings with --set [sweep: {d.sweep}]")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of --sampler (repeatable)")
    w.add_argument("--num-steps", type=int, help="DDIM steps of every sampler [each sampler's default, 50]")
    w.add_argument("--batch-size", type=int, help=f"images per sampler run (cells sampled together) [{d.batch_size}]")
    w.add_argument("--no-share", action="store_true",
                   help="sample each setting on its own instead of all settings of a subject together "
                        "(shared trajectory prefixes, packed UNet batches; same images to float rounding)")
    w.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   help="torch.compile the UNet (static shapes): MODE default, reduce-overhead, max-autotune, "
                        "max-autotune-no-cudagraphs [off]")
    w.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help=f"model dtype for sampling [{d.dtype}]")
    w.add_argument("--unet-batch", type=int, help=f"rows per UNet call when settings are shared (32-64 on a GPU) [{d.unet_batch}]")
    e = p.add_argument_group("metrics")
    e.add_argument("--clip", help=f"CLIP hub id or folder ('tiny': tiny random backbone) [{d.clip}]")
    e.add_argument("--dino", help=f"DINO / DINOv2 hub id or folder, e.g. facebook/dinov2-small ('tiny', 'tiny-dinov2') [{d.dino}]")
    e.add_argument("--no-dino", action="store_true", help="skip the DINO metric")
    e.add_argument("--clip-backend", choices=["transformers", "open_clip"], help=f"[{d.clip_backend}]")
    e.add_argument("--clip-t-text", choices=["superclass", "remove"], help=f"CLIP-T text: slot filled with the superclass word, or removed [{d.clip_t_text}]")
    e.add_argument("--judge", help="MiniWorld judge folder (miniworld/pretrained/judge): also the ground-truth identity and "
                                   "prompt accuracy of MiniWorld concepts [none]")
    r = p.add_argument_group("run")
    r.add_argument("--output", help=f"output folder (results.csv, plots, grids) [{d.output}]")
    r.add_argument("--device", help=f"device of a single-process run: auto, cpu, cuda, cuda:1 [{d.device}]")
    r.add_argument("--devices", type=int, help=f"ranks per node; > 1 runs Lightning Fabric DDP [{d.devices}]")
    r.add_argument("--accelerator", help=f"Fabric accelerator: auto, gpu, cpu [{d.accelerator}]")
    r.add_argument("--num-nodes", type=int, help=f"nodes of a Fabric run (SLURM / torchrun) [{d.num_nodes}]")
    r.add_argument("--no-grids", action="store_true", help="do not save image grids")
    r.add_argument("--wandb-project", help="log the tables and plots to this W&B project (WANDB_MODE=offline works)")
    r.add_argument("--wandb-name", help="W&B run name")
    r.add_argument("--log-grids", action="store_true", help="also log every cell's image grid to W&B")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    from evaluation import EvalConfig

    cfg = EvalConfig.from_yaml(
        args.config, model=args.model, artifact=args.artifact, dreambooth_root=args.dreambooth_root,
        subjects=args.subjects, concept_dir=args.concept_dir, superclass=args.superclass, prompts=args.prompts,
        num_prompts=args.num_prompts, num_images=args.num_images, seed=args.seed, batch_size=args.batch_size,
        clip=args.clip, dino=args.dino, clip_backend=args.clip_backend, clip_t_text=args.clip_t_text,
        judge=args.judge, output=args.output, device=args.device, devices=args.devices, accelerator=args.accelerator,
        num_nodes=args.num_nodes, wandb_project=args.wandb_project, wandb_name=args.wandb_name,
        unet_batch=args.unet_batch, compile=args.compile, dtype=args.dtype,
    )
    if args.no_share:
        cfg.share = False
    if args.sweep:
        data = yaml.safe_load(open(args.sweep)) or []
        cfg.sweep = data.get("sweep", []) if isinstance(data, dict) else data
    if args.sampler:
        settings = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--set {item!r}: write KEY=VALUE, e.g. --set guidance_concept=3.5")
            settings[key.strip()] = yaml.safe_load(value)
        cfg.sweep = [{"sampler": args.sampler, "settings": settings}]
    elif args.set:
        raise SystemExit("--set needs --sampler NAME.")
    if args.num_steps is not None:
        cfg.defaults = {**cfg.defaults, "num_steps": args.num_steps}
    if args.no_dino:
        cfg.dino = None
    cfg.save_grids = cfg.save_grids and not args.no_grids
    cfg.log_grids = cfg.log_grids or args.log_grids
    return cfg


def check_models(cfg, subjects, num_steps: int) -> None:
    """The base model and every subject's artifact, checked in seconds before any work."""
    from components.loader import check_model_source, check_num_steps

    if cfg.artifact:
        from lightning_modules.base import read_artifact_manifest

        bases = {cfg.model or read_artifact_manifest(cfg.artifact.format(subject=s.name))["pretrained_model"]
                 for s in subjects}
    else:
        bases = {cfg.model}
    for base in sorted(bases):
        check_model_source(base)
        check_num_steps(base, num_steps)


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from evaluation import Ranks, fabric_ranks, run_evaluation
    from evaluation.run import resolve_device

    cfg = build_config(parse_args(argv))
    from evaluation import expand_sweep
    from evaluation.run import build_subjects

    # bad input fails here, before any process is launched
    if cfg.model is None and not cfg.artifact:
        raise SystemExit("Nothing to evaluate: pass --model (hub id, folder, 'tiny') and/or --artifact.")
    subjects = build_subjects(cfg)
    points = expand_sweep(cfg.sweep, cfg.defaults)
    check_models(cfg, subjects, max((p.build().num_steps for p in points), default=1))
    ranks = fabric_ranks(cfg) if cfg.devices * cfg.num_nodes > 1 else Ranks(device=resolve_device(cfg.device))
    run = None
    if cfg.wandb_project and ranks.rank == 0:
        import wandb

        os.makedirs(cfg.output, exist_ok=True)
        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name, config=asdict(cfg), dir=cfg.output, job_type="eval")
    try:
        rows = run_evaluation(cfg, ranks)
    finally:
        if run is not None:
            run.finish()
    if ranks.rank == 0:
        print(f"[eval] {len(rows)} rows in {os.path.join(cfg.output, 'results.csv')}; plot: {os.path.join(cfg.output, 'pareto.png')}")
    return rows


if __name__ == "__main__":
    from components.errors import run_command

    run_command(main, prog="evaluate.py")
