"""Evaluate a base model or a trained artifact on the DreamBooth protocol, over sampler settings.

    # the mixed-sampling Pareto sweep of a trained artifact per subject
    python evaluate.py --config configs/eval/mixed_sweep.yaml \\
        --artifact 'outputs/{subject}/artifact' --dreambooth_root ../shared/dreambooth --subjects dog cat

    # one sampler setting, base model, a custom concept folder
    python evaluate.py --model stabilityai/stable-diffusion-2-base --concept_dir my_dog --superclass dog \\
        --sampler mixed --settings.guidance_concept 3.5 --settings.guidance_superclass 3.5

    # CPU smoke run: tiny model, tiny backbones, the synthetic demo concept
    python evaluate.py --config configs/eval/quickstart.yaml

    # 4 GPUs (Lightning Fabric DDP): each rank takes its share of the cells
    python evaluate.py --config configs/eval/mixed_sweep.yaml --devices 4

    # a MiniWorld concept, with the world's ground truth (judge identity / prompt accuracy)
    python -m miniworld write-concept orange_checkered_ball concepts/ball
    python evaluate.py --model miniworld/pretrained/sd --concept_dir concepts/ball --superclass ball \
        --clip miniworld/pretrained/clip --dino miniworld/pretrained/dino --judge miniworld/pretrained/judge

Writes to ``--output``: results.csv (subject, sampler, setting, CLIP-I, CLIP-T, DINO, UNet
evaluations per image; with --judge also identity and prompt accuracy), summary.csv (mean over subjects, Pareto flags), pareto.png and
pareto_dino.png, grids/ (rows prompts, columns images). Rerunning the same command skips
the cells already in results.csv. Options are spelled as the config's keys (``--concept_dir``);
the older dashed spellings (``--concept-dir``, ``--no-dino``, ``--set KEY=VALUE``) keep working;
``--print_config`` prints the resolved options as a config that ``--config`` reads back. A mistake is one short message naming the fix; ``--debug``
(or ``PERSONALIZE_DEBUG=1``) shows its traceback.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from evaluation.run import EvalConfig

PROG = "evaluate.py"


@dataclass
class EvaluateOptions(EvalConfig):
    """evaluate.py's options: the evaluation config's keys, and one sampler instead of a sweep.

    Args:
        sampler: evaluate this one sampler (a name, or a sampler YAML; replaces the sweep), with --settings.
        settings: settings of --sampler: --settings.KEY VALUE (old spelling: --set KEY=VALUE, repeatable).
        num_steps: DDIM steps of every sampler (default: each sampler's own, 50).
    """

    sampler: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    num_steps: int | None = None

    def __post_init__(self) -> None:
        pass  # validated as an EvalConfig by build_config


def read_sweep(path: str) -> list[str]:
    """The old ``--sweep FILE``: the file's entries (a list, or a mapping with a 'sweep' key) as the option's value."""
    import json

    from components.errors import MissingFileError

    if path.lstrip().startswith(("[", "{")):
        return ["--sweep", path]  # already a sweep
    if not Path(path).is_file():
        raise MissingFileError(f"--sweep {path}: no such file", fix="give a sweep YAML (see configs/eval/)")
    data = yaml.safe_load(Path(path).read_text()) or []
    return ["--sweep", json.dumps(data.get("sweep", []) if isinstance(data, dict) else data)]


#: the old spellings that are not just dashes for underscores
ALIASES = {
    "--no-share": ["--share", "false"], "--no-dino": ["--dino", "null"], "--no-grids": ["--save_grids", "false"],
    "--log-grids": ["--log_grids", "true"], "--sweep": read_sweep,
}


def build_parser():
    from components.cli import command_parser

    return command_parser(
        EvaluateOptions, prog=PROG,
        description="CLIP-I / CLIP-T / DINO evaluation of personalized models over sampler settings\n"
        "(DreamBooth protocol: 25 prompts x N images per subject). --config takes the keys of an\n"
        "evaluation config (configs/eval/); options after it override them.",
        epilog=__doc__.split("\n\n", 1)[1] + "\nOld spellings kept: --no-share (--share false), --no-dino "
        "(--dino null), --no-grids (--save_grids false), --log-grids (--log_grids true), --sweep FILE, "
        "--set KEY=VALUE (--settings.KEY VALUE).",
    )


def parse_args(argv=None) -> EvaluateOptions:
    from components.cli import parse_options, set_alias

    return parse_options(build_parser(), EvaluateOptions, argv, aliases={**ALIASES, "--set": set_alias("--settings")},
                         bare={"--compile": "default"})


def build_config(options: EvaluateOptions) -> EvalConfig:
    from components.errors import UserError
    from samplers import sampler_spec

    values = {f.name: getattr(options, f.name) for f in fields(EvalConfig)}
    if options.sampler:
        name, settings = sampler_spec(options.sampler, None, options.settings)
        values["sweep"] = [{"sampler": name, "settings": settings}]
    elif options.settings:
        raise UserError("--settings (--set) needs --sampler NAME", fix="add --sampler NAME, or put the settings in the sweep")
    if options.num_steps is not None:
        values["defaults"] = {**values["defaults"], "num_steps": options.num_steps}
    return EvalConfig(**values)


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from components.cli import user_errors

    with user_errors(PROG, (ValueError, FileNotFoundError, yaml.YAMLError)):  # bad input fails here, before any launch
        cfg = build_config(parse_args(argv))
        from evaluation import expand_sweep
        from evaluation.run import build_subjects
        from lightning_modules.loading import check_model

        if cfg.model is None and not cfg.artifact:
            raise ValueError("Nothing to evaluate: pass --model (hub id, folder, 'tiny') and/or --artifact.")
        subjects = build_subjects(cfg)
        points = expand_sweep(cfg.sweep, cfg.defaults)
        artifacts = sorted({cfg.artifact.format(subject=s.name) for s in subjects}) if cfg.artifact else []
        check_model(cfg.model, artifacts, max((p.build().num_steps for p in points), default=1))
    from evaluation import Ranks, fabric_ranks, run_evaluation
    from evaluation.run import resolve_device

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
