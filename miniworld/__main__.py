"""Command line of MiniWorld: ``python -m miniworld <command> ...``.

Commands:
  write-concept NAME FOLDER   write a concept folder (NAME "all": one subfolder per concept);
                              --context scene (one shared scene, default) | prop | varied
  preview OUT.png             a contact sheet: one row per scene, then the concepts
  before-after ARTIFACT OUT.png
                              the base model vs a fine-tuned artifact's concept and superclass samplers
  train-vae --out DIR         stage 1 of the text-to-image model
  train-judge --out DIR       the attribute classifier used by the quality script
  train-clip --out DIR        the CLIP-like encoder of the metrics
  train-dino --out DIR        the DINO-like identity encoder of the metrics
The text-to-image model itself trains through the project's CLI:
  python train.py fit --config configs/miniworld/pretrain.yaml
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PROG = "python -m miniworld"


@dataclass
class WriteConcept:
    """Write a concept folder (its views, prompts.txt and concept.json).

    Args:
        name: concept name, e.g. orange_checkered_ball ("all": one subfolder per concept).
        folder: the folder to write.
        num_images: views of the concept.
        size: image size in pixels.
        seed: seed of the views.
        placeholder: identifier word written in the folder's prompts.
        context: views in the concept's one scene (scene), + a shared prop (prop), or each in another scene (varied).
    """

    name: str
    folder: str
    num_images: int = 5
    size: int = 32
    seed: int = 0
    placeholder: str = "sks"
    context: Literal["scene", "prop", "varied"] = "scene"


@dataclass
class Preview:
    """A contact sheet of the world: one row per scene, then the concepts.

    Args:
        out: the PNG to write.
        seed: seed of the renders.
        scale: pixel scale of the sheet.
    """

    out: str
    seed: int = 0
    scale: int = 3


@dataclass
class BeforeAfter:
    """A before/after picture of a fine-tuned artifact: the base model asked for the concept
    phrase, then the artifact's concept and superclass samplers, over the first MiniWorld
    prompts (the same x_T in every row).

    Args:
        artifact: the trained artifact folder (e.g. outputs/quickstart/artifact).
        out: the PNG to write.
        concept: concept source of the training views shown on top (e.g.
            miniworld:orange_checkered_ball:scene:20); none: no such row.
        num_prompts: the first N MiniWorld prompts, one column each.
        num_images: images per prompt and row.
        num_steps: DDIM steps.
        guidance: classifier-free guidance of the concept rows (before and after); none:
            the concept sampler's default (7). The superclass row keeps its default.
        seed: base seed of the latents.
        scale: pixel scale of the picture.
    """

    artifact: str
    out: str
    concept: str | None = None
    num_prompts: int = 8
    num_images: int = 2
    num_steps: int = 25
    guidance: float | None = None
    seed: int = 0
    scale: int = 3


@dataclass
class Train:
    """Train one of the world's models.

    Args:
        out: output folder (required).
        steps: training steps (default: the model's own).
        seed: seed of the data and the initialisation.
    """

    out: str | None = None
    steps: int | None = None
    seed: int = 0


COMMANDS = {
    "write-concept": (WriteConcept, "write a concept folder"),
    "preview": (Preview, "contact sheet of the world"),
    "before-after": (BeforeAfter, "base model vs a fine-tuned artifact's concept and superclass samplers"),
    "train-vae": (Train, "stage 1 of the text-to-image model"),
    "train-judge": (Train, "the attribute classifier used by the quality script"),
    "train-clip": (Train, "the CLIP-like encoder of the metrics"),
    "train-dino": (Train, "the DINO-like identity encoder of the metrics"),
}


def parse(argv: list[str] | None = None):
    """(command, its options) from the command line; dashed spellings (--num-images) kept."""
    from components.cli import parse_subcommand, subcommands_parser

    return parse_subcommand(subcommands_parser(PROG, __doc__, COMMANDS, positional=True), COMMANDS, argv)


def main(argv: list[str] | None = None) -> None:
    command, args = parse(argv)
    if command == "write-concept":
        from miniworld.concepts import write_concept
        from miniworld.world import CONCEPTS

        names = sorted(CONCEPTS) if args.name == "all" else [args.name]
        for name in names:
            folder = f"{args.folder}/{name}" if args.name == "all" else args.folder
            write_concept(name, folder, args.num_images, args.size, args.seed, args.placeholder, args.context)
            print(f"wrote {folder}")
    elif command == "preview":
        from miniworld.world import World

        World(args.seed).contact_sheet(scale=args.scale).save(args.out)
        print(f"wrote {args.out}")
    elif command == "before-after":
        from miniworld.figures import before_after

        if args.num_prompts < 1 or args.num_images < 1 or args.scale < 1:
            from components.errors import UserError

            raise UserError("num_prompts, num_images and scale must be 1 or more")
        before_after(args.artifact, args.out, args.concept, args.num_prompts, args.num_images, args.num_steps,
                     guidance=args.guidance, seed=args.seed, scale=args.scale)
        print(f"wrote {args.out}")
    else:
        if not args.out:
            from components.errors import UserError

            raise UserError(f"{command} needs an output folder", fix=f"{PROG} {command} --out DIR")
        kw = dict(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
        if command == "train-vae":
            from miniworld.vae import train_vae as train
        elif command == "train-judge":
            from miniworld.judge import train_judge as train
        elif command == "train-clip":
            from miniworld.encoders import train_clip as train
        else:
            from miniworld.encoders import train_dino as train
        train(args.out, **kw)


if __name__ == "__main__":
    from components.errors import run_command

    run_command(main, prog=PROG)
