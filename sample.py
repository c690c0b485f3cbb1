"""Sample a personalized model with any sampling strategy: PNG files and a manifest.

    python sample.py --model tiny --superclass dog --sampler mixed \\
        --prompts "a {} on the beach" "a red {}" --num_images 4 --out outputs/samples
    python sample.py --artifact outputs/dog/artifact --sampler_config configs/samplers/masked.yaml \\
        --settings.q 0.5 --dreambooth_prompts live --num_images 10 --out outputs/dog-masked
    python sample.py --config my_run.yaml --seed 1      # options from YAML (keys as below), layered
    python sample.py ... --print_config > my_run.yaml   # the resolved options as such a YAML

Options are spelled as their YAML keys (``--num_images``); the older dashed spellings
(``--num-images``, ``--sampler-config``, ``--dreambooth-prompts``, ``--batch-size``) and
``--set KEY=VALUE`` (``--settings.KEY VALUE``) keep working.

Prompts are templates with one {} slot for the subject; the sampler writes the concept
and superclass prompts itself. Images are named ``p<prompt index>_i<image index>.png``;
``manifest.jsonl`` holds one record per image (prompt, template, seed, index, sampler,
settings, cost) and ``run.json`` the settings of the run. Running the same command again
resumes: images already written are skipped. An output folder holding images made with
other settings is an error, never silently mixed. A mistake is one short message naming the
fix; ``--debug`` (or ``PERSONALIZE_DEBUG=1``) shows its traceback.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from components.errors import MissingFileError
from components.linefile import drop_torn_tail, read_lines
from components.runs import RUN_FILE, check_identity, write_identity

MANIFEST_FILE = "manifest.jsonl"
PROG = "sample.py"


@dataclass
class SampleOptions:
    """What to sample, with which sampler, into which folder.

    Args:
        model: base model: hub id, diffusers folder or 'tiny' (default with --artifact: the base the artifact was
            trained on).
        artifact: artifact folder of any fine-tuning method (personalize.json inside).
        superclass: the concept's class word, e.g. 'dog' (required without --artifact).
        placeholder: identifier word of the base model's concept phrase.
        device: cpu, cuda, cuda:1 ... (default: cuda if available).
        dtype: the model's dtype for sampling.
        compile: torch.compile the UNet (static shapes; the first batch compiles): default, reduce-overhead,
            max-autotune, max-autotune-no-cudagraphs (a bare --compile: default; null: off).
        sampler: sampler name (see below), or a sampler YAML.
        sampler_config: sampler YAML, e.g. configs/samplers/mixed.yaml (old spelling: --sampler-config).
        settings: sampler settings over the YAML's and the defaults: --settings.KEY VALUE (old spelling: --set
            KEY=VALUE, repeatable); values are YAML: 7, [7, 6, 5], 0.5.
        prompts: prompt templates with a {} slot, or one text file of them.
        dreambooth_prompts: the 25 DreamBooth prompts of the object or live set (instead of --prompts).
        num_images: images per prompt (image indices 0 ... n-1).
        seed: base seed; x_T of each image derives from it.
        batch_size: images per UNet batch.
        out: output folder (required).
    """

    model: str | None = None
    artifact: str | None = None
    superclass: str | None = None
    placeholder: str = "sks"
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    compile: str | None = None
    sampler: str | None = None
    sampler_config: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] | None = None
    dreambooth_prompts: Literal["object", "live"] | None = None
    num_images: int = 4
    seed: int = 0
    batch_size: int = 8
    out: str | None = None


def image_name(prompt_index: int, index: int) -> str:
    return f"p{prompt_index:03d}_i{index:03d}.png"


def build_parser():
    from components.cli import command_parser
    from samplers import SAMPLERS

    samplers_help = "\n".join(
        f"  {name:<11} " + ", ".join(
            f"{p.name}={p.default}" for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        )
        for name, cls in SAMPLERS.items()
    )
    return command_parser(
        SampleOptions, prog=PROG,
        description="Sample a base model or a fine-tuned artifact with a sampling strategy.",
        epilog=f"samplers and their settings (defaults of the sampling study, 50 steps):\n{samplers_help}",
    )


def parse_options(argv: list[str] | None = None) -> SampleOptions:
    from components.cli import parse_options as parse, set_alias

    return parse(build_parser(), SampleOptions, argv, aliases={"--set": set_alias("--settings")},
                 bare={"--compile": "default"})


def resolve_sampler(options: SampleOptions):
    """The validated sampler of --sampler / --sampler_config / --settings (ValueError if bad)."""
    from samplers import build_sampler, sampler_spec

    name, settings = sampler_spec(options.sampler, options.sampler_config, options.settings)
    return build_sampler(name, **settings)


def resolve_templates(options: SampleOptions) -> list[str]:
    from components.personalized import fill
    from datamodules.prompts import dreambooth_prompts, read_prompt_file

    if options.dreambooth_prompts:
        if options.prompts:
            raise ValueError("give --prompts or --dreambooth_prompts, not both")
        return dreambooth_prompts(options.dreambooth_prompts)
    if not options.prompts:
        raise ValueError("give the prompts: --prompts 'a {} on the beach' ... (or a file of them), "
                         "or --dreambooth_prompts object|live")
    templates = list(options.prompts)
    if len(templates) == 1 and Path(templates[0]).is_file():
        templates = read_prompt_file(templates[0])
    elif len(templates) == 1 and "{}" not in templates[0] and Path(templates[0]).suffix in (".txt", ".yaml", ".csv"):
        raise MissingFileError(f"--prompts {templates[0]}: no such file",
                               fix="give an existing file of templates (one per line), or templates with a {} slot")
    for t in templates:
        fill(t, "x")  # ValueError naming the template without a {} slot
    return templates


def run_identity(options: SampleOptions, sampler) -> dict:
    """What determines the images: two runs into one folder must agree on all of it."""
    return {
        "model": options.model,
        "artifact": str(Path(options.artifact).resolve()) if options.artifact else None,
        "superclass": options.superclass,
        "placeholder": options.placeholder if not options.artifact else None,
        "dtype": options.dtype,
        "sampler": sampler.name,
        "settings": sampler.settings(),
        "seed": options.seed,
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
    records = read_manifest(out)
    check_identity(out, identity, in_use=bool(records),
                   problem="--out {folder} already holds images made with different settings ({changes})",
                   fix="choose another --out, or delete the folder to start over")
    for prompt_index, template, index in cells:
        record = records.get(image_name(prompt_index, index))
        if record and record["template"] != template:
            raise ValueError(
                f"--out {out}: prompt {prompt_index} was {record['template']!r} there, now {template!r}; "
                f"keep the prompt list in order, or choose another --out"
            )


def load_model(options: SampleOptions):
    from lightning_modules.loading import load_model as load

    return load(options.model, options.artifact, superclass=options.superclass, placeholder=options.placeholder,
                device=options.device, dtype=options.dtype, compile=options.compile)


def save_png(image, path: Path) -> None:
    from components.pixels import tensor_to_pil

    tensor_to_pil(image).save(path)


def main(argv: list[str] | None = None) -> Path:
    from components.cli import user_errors

    with user_errors(PROG, (ValueError, FileNotFoundError, yaml.YAMLError)):  # every check that needs no model
        options = parse_options(argv)
        sampler = resolve_sampler(options)
        if hasattr(sampler, "check_ready"):
            sampler.check_ready()  # reference_guided: its concept images and captions, before any model loads
        templates = resolve_templates(options)
        if options.num_images < 1 or options.batch_size < 1:
            raise ValueError(f"--num-images ({options.num_images}) and --batch-size ({options.batch_size}) must be >= 1")
        if not options.artifact and not (options.model and options.superclass):
            raise ValueError("without --artifact, give the base model (--model) and the concept's --superclass")
        if not options.out:
            raise ValueError("give the output folder: --out FOLDER")
        from lightning_modules.loading import check_model

        # a typo, a broken artifact or an unreachable hub id fails now, in seconds
        check_model(options.model, [options.artifact] if options.artifact else [], sampler.num_steps)
        out = Path(options.out)
        identity = run_identity(options, sampler)
        cells = [(p, t, i) for p, t in enumerate(templates) for i in range(options.num_images)]
        check_out_dir(out, identity, cells)

    done = {f for f in read_manifest(out) if (out / f).exists()}
    todo = [c for c in cells if image_name(c[0], c[2]) not in done]
    print(f"{sampler!r}: {len(cells) - len(todo)} of {len(cells)} images already in {out}, {len(todo)} to make")
    if not todo:
        return out
    from components.personalized import concept_prompt, superclass_prompt
    from tqdm.auto import tqdm

    model = load_model(options)
    out.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(out / MANIFEST_FILE)  # the next record starts on a line of its own
    with tqdm(total=len(todo), desc=sampler.name, unit="img") as bar, open(out / MANIFEST_FILE, "a") as manifest:
        for start in range(0, len(todo), options.batch_size):
            chunk = todo[start : start + options.batch_size]
            result = sampler.sample_cells(model, [(t, i) for _, t, i in chunk], options.seed, options.batch_size)
            for (prompt_index, template, index), image in zip(chunk, result.images):
                name = image_name(prompt_index, index)
                save_png(image, out / name)
                record = {
                    "file": name, "prompt_index": prompt_index, "index": index, "template": template,
                    "prompt": concept_prompt(model, template), "superclass_prompt": superclass_prompt(model, template),
                    "seed": options.seed, "sampler": sampler.name, "settings": sampler.settings(), "cost": result.cost,
                    "model": options.model, "artifact": identity["artifact"],
                }
                if not manifest.tell() or not (out / RUN_FILE).exists():
                    write_identity(out, identity)  # the run's identity, once its first image exists
                manifest.write(json.dumps(record) + "\n")
            manifest.flush()
            bar.update(len(chunk))
    return out


if __name__ == "__main__":
    from components.errors import run_command

    run_command(main, prog="sample.py")
