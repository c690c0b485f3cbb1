"""Sample a personalized model with any sampling strategy: PNG files and a manifest.

    python sample.py --model tiny --superclass dog --sampler mixed \\
        --prompts "a {} on the beach" "a red {}" --num-images 4 --out outputs/samples
    python sample.py --artifact outputs/dog/artifact --sampler-config configs/samplers/masked.yaml \\
        --set q=0.5 --dreambooth-prompts live --num-images 10 --out outputs/dog-masked

Prompts are templates with one {} slot for the subject; the sampler writes the concept
and superclass prompts itself. Images are named ``p<prompt index>_i<image index>.png``;
``manifest.jsonl`` holds one record per image (prompt, template, seed, index, sampler,
settings, cost) and ``run.json`` the settings of the run. Running the same command again
resumes: images already written are skipped. An output folder holding images made with
other settings is an error, never silently mixed. A mistake is one short message naming the
fix; ``--debug`` (or ``PERSONALIZE_DEBUG=1``) shows its traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import yaml

from components.atomic import atomic_path
from components.errors import MissingFileError
from components.linefile import drop_torn_tail, read_lines

RUN_FILE, MANIFEST_FILE = "run.json", "manifest.jsonl"
DTYPES = ("float32", "float16", "bfloat16")


def image_name(prompt_index: int, index: int) -> str:
    return f"p{prompt_index:03d}_i{index:03d}.png"


def build_parser() -> argparse.ArgumentParser:
    from samplers import SAMPLERS

    samplers_help = "\n".join(
        f"  {name:<11} " + ", ".join(
            f"{p.name}={p.default}" for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        )
        for name, cls in SAMPLERS.items()
    )
    parser = argparse.ArgumentParser(
        prog="sample.py",
        description="Sample a base model or a fine-tuned artifact with a sampling strategy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"samplers and their settings (defaults of the sampling study, 50 steps):\n{samplers_help}",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="base model: hub id, diffusers folder or 'tiny' (default with --artifact: "
                                       "the base the artifact was trained on)")
    model.add_argument("--artifact", help="artifact folder of any fine-tuning method (personalize.json inside)")
    model.add_argument("--superclass", help="the concept's class word, e.g. 'dog' (required without --artifact)")
    model.add_argument("--placeholder", default="sks", help="identifier word of the base model's concept phrase")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    model.add_argument("--dtype", default="float32", choices=DTYPES)
    model.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                       help="torch.compile the UNet (static shapes; the first batch compiles): MODE default, "
                            "reduce-overhead, max-autotune, max-autotune-no-cudagraphs [off]")
    sampler = parser.add_argument_group("sampler")
    sampler.add_argument("--sampler", help="sampler name (see below)")
    sampler.add_argument("--sampler-config", help="sampler YAML, e.g. configs/samplers/mixed.yaml")
    sampler.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a sampler setting (repeatable); values are YAML: 7, [7, 6, 5], 0.5")
    prompts = parser.add_argument_group("prompts").add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", nargs="+", help="prompt templates with a {} slot, or one text file of them")
    prompts.add_argument("--dreambooth-prompts", choices=("object", "live"), help="the 25 DreamBooth prompts")
    run = parser.add_argument_group("run")
    run.add_argument("--num-images", type=int, default=4, help="images per prompt (image indices 0 ... n-1)")
    run.add_argument("--seed", type=int, default=0, help="base seed; x_T of each image derives from it")
    run.add_argument("--batch-size", type=int, default=8, help="images per UNet batch")
    run.add_argument("--out", required=True, help="output folder")
    return parser


def resolve_sampler(args):
    """The validated sampler from --sampler / --sampler-config / --set (ValueError if bad)."""
    from samplers import build_sampler, load_sampler_config

    settings = {}
    name = args.sampler
    if args.sampler_config:
        file_name, settings = load_sampler_config(args.sampler_config)
        if name and name != file_name:
            raise ValueError(f"--sampler {name} contradicts {args.sampler_config}, which configures '{file_name}'")
        name = file_name
    if not name:
        raise ValueError("choose a sampler with --sampler NAME or --sampler-config YAML")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. --set guidance=5")
        settings[key.strip()] = yaml.safe_load(value)
    return build_sampler(name, **settings)


def resolve_templates(args) -> list[str]:
    from components.personalized import fill
    from datamodules.prompts import dreambooth_prompts, read_prompt_file

    if args.dreambooth_prompts:
        return dreambooth_prompts(args.dreambooth_prompts)
    templates = list(args.prompts)
    if len(templates) == 1 and Path(templates[0]).is_file():
        templates = read_prompt_file(templates[0])
    elif len(templates) == 1 and "{}" not in templates[0] and Path(templates[0]).suffix in (".txt", ".yaml", ".csv"):
        raise MissingFileError(f"--prompts {templates[0]}: no such file",
                               fix="give an existing file of templates (one per line), or templates with a {} slot")
    for t in templates:
        fill(t, "x")  # ValueError naming the template without a {} slot
    return templates


def run_identity(args, sampler) -> dict:
    """What determines the images: two runs into one folder must agree on all of it."""
    return {
        "model": args.model,
        "artifact": str(Path(args.artifact).resolve()) if args.artifact else None,
        "superclass": args.superclass,
        "placeholder": args.placeholder if not args.artifact else None,
        "dtype": args.dtype,
        "sampler": sampler.name,
        "settings": sampler.settings(),
        "seed": args.seed,
    }


def _record(line: str) -> dict:
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise ValueError("not an image record")
    return record


def read_manifest(out: Path) -> dict[str, dict]:
    """The manifest's records by file name: an unfinished last line (a run killed while
    writing it) is dropped with a warning; a damaged line elsewhere names the file and line."""
    return {r["file"]: r for r in read_lines(out / MANIFEST_FILE, _record, what="image")}


def check_out_dir(out: Path, identity: dict, cells: list[tuple[int, str, int]]) -> None:
    """ValueError if ``out`` holds images made with other settings or other prompts at the
    same names (a folder holding no image yet is free, whatever its run.json says)."""
    run_file = out / RUN_FILE
    records = read_manifest(out)
    if run_file.exists() and records:
        previous = json.loads(run_file.read_text())
        diffs = [k for k in identity if previous.get(k) != identity[k]]
        if diffs:
            detail = "; ".join(f"{k}: {previous.get(k)!r} -> {identity[k]!r}" for k in diffs)
            raise ValueError(
                f"--out {out} already holds images made with different settings ({detail}); "
                f"choose another --out, or delete the folder to start over"
            )
    for prompt_index, template, index in cells:
        record = records.get(image_name(prompt_index, index))
        if record and record["template"] != template:
            raise ValueError(
                f"--out {out}: prompt {prompt_index} was {record['template']!r} there, now {template!r}; "
                f"keep the prompt list in order, or choose another --out"
            )


def check_model(args, sampler) -> None:
    from components.loader import check_model_source, check_num_steps

    base = args.model
    if args.artifact:
        from lightning_modules.base import read_artifact_manifest  # lazy: Lightning is heavy to import

        base = args.model or read_artifact_manifest(args.artifact)["pretrained_model"]
    check_model_source(base)
    check_num_steps(base, sampler.num_steps)


def write_identity(path: Path, identity: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(identity, indent=2))


def load_model(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.artifact:
        from lightning_modules import load_personalized  # lazy: Lightning is heavy to import

        overrides = {"superclass": args.superclass} if args.superclass else {}
        model = load_personalized(args.model, args.artifact, **overrides)
    else:
        from components.loader import load_components
        from components.personalized import BaseModel

        model = BaseModel(load_components(args.model), superclass=args.superclass, placeholder=args.placeholder)
    move = {"device": device}
    if dtype != model.components.unet.dtype:
        move["dtype"] = dtype  # only when it changes: diffusers warns on every dtype cast
    if isinstance(model, torch.nn.Module):
        model.to(**move)
    else:
        for module in model.components.modules().values():
            module.to(**move)
    if args.compile:
        from components.compile import compile_unet

        compile_unet(model.components.unet, args.compile)
    return model


def save_png(image, path: Path) -> None:
    from PIL import Image

    array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()  # (H, W, 3) uint8
    Image.fromarray(array).save(path)


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # every check that needs no model, before any work
        sampler = resolve_sampler(args)
        if hasattr(sampler, "check_ready"):
            sampler.check_ready()  # reference_guided: its concept images and captions, before any model loads
        templates = resolve_templates(args)
        if args.num_images < 1 or args.batch_size < 1:
            raise ValueError(f"--num-images ({args.num_images}) and --batch-size ({args.batch_size}) must be >= 1")
        if not args.artifact and not (args.model and args.superclass):
            raise ValueError("without --artifact, give the base model (--model) and the concept's --superclass")
        check_model(args, sampler)  # a typo, a broken artifact or an unreachable hub id fails now, in seconds
        out = Path(args.out)
        identity = run_identity(args, sampler)
        cells = [(p, t, i) for p, t in enumerate(templates) for i in range(args.num_images)]
        check_out_dir(out, identity, cells)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as err:
        parser.error(str(err))

    done = {f for f in read_manifest(out) if (out / f).exists()}
    todo = [c for c in cells if image_name(c[0], c[2]) not in done]
    print(f"{sampler!r}: {len(cells) - len(todo)} of {len(cells)} images already in {out}, {len(todo)} to make")
    if not todo:
        return out
    from components.personalized import concept_prompt, superclass_prompt
    from tqdm.auto import tqdm

    model = load_model(args)
    out.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(out / MANIFEST_FILE)  # the next record starts on a line of its own
    with tqdm(total=len(todo), desc=sampler.name, unit="img") as bar, open(out / MANIFEST_FILE, "a") as manifest:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start : start + args.batch_size]
            result = sampler.sample_cells(model, [(t, i) for _, t, i in chunk], args.seed, args.batch_size)
            for (prompt_index, template, index), image in zip(chunk, result.images):
                name = image_name(prompt_index, index)
                save_png(image, out / name)
                record = {
                    "file": name, "prompt_index": prompt_index, "index": index, "template": template,
                    "prompt": concept_prompt(model, template), "superclass_prompt": superclass_prompt(model, template),
                    "seed": args.seed, "sampler": sampler.name, "settings": sampler.settings(), "cost": result.cost,
                    "model": args.model, "artifact": identity["artifact"],
                }
                if not manifest.tell() or not (out / RUN_FILE).exists():
                    write_identity(out / RUN_FILE, identity)  # the run's identity, once its first image exists
                manifest.write(json.dumps(record) + "\n")
            manifest.flush()
            bar.update(len(chunk))
    return out


if __name__ == "__main__":
    from components.errors import run_command

    run_command(main, prog="sample.py")
