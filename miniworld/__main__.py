"""Command line of MiniWorld: ``python -m miniworld <command> ...``.

Commands:
  write-concept NAME FOLDER   write a concept folder (NAME "all": one subfolder per concept);
                              --context scene (one shared scene, default) | prop | varied
  preview OUT.png             a contact sheet: one row per scene, then the concepts
  train-vae --out DIR         stage 1 of the text-to-image model
  train-judge --out DIR       the attribute classifier used by the quality script
  train-clip --out DIR        the CLIP-like encoder of the metrics
  train-dino --out DIR        the DINO-like identity encoder of the metrics
The text-to-image model itself trains through the project's CLI:
  python train.py fit --config configs/miniworld/pretrain.yaml
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m miniworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("write-concept", help="write a concept folder")
    p.add_argument("name")
    p.add_argument("folder")
    p.add_argument("--num-images", type=int, default=5)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--placeholder", default="sks")
    p.add_argument("--context", default="scene", choices=["scene", "prop", "varied"],
                   help="views in the concept's one scene, + a shared prop, or each in another scene")

    p = sub.add_parser("preview", help="contact sheet of the world")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=3)

    for name in ("train-vae", "train-judge", "train-clip", "train-dino"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=None)
        p.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "write-concept":
        from miniworld.concepts import write_concept
        from miniworld.world import CONCEPTS

        names = sorted(CONCEPTS) if args.name == "all" else [args.name]
        for name in names:
            folder = f"{args.folder}/{name}" if args.name == "all" else args.folder
            write_concept(name, folder, args.num_images, args.size, args.seed, args.placeholder, args.context)
            print(f"wrote {folder}")
    elif args.command == "preview":
        from miniworld.world import World

        World(args.seed).contact_sheet(scale=args.scale).save(args.out)
        print(f"wrote {args.out}")
    else:
        kw = dict(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
        if args.command == "train-vae":
            from miniworld.vae import train_vae as train
        elif args.command == "train-judge":
            from miniworld.judge import train_judge as train
        elif args.command == "train-clip":
            from miniworld.encoders import train_clip as train
        else:
            from miniworld.encoders import train_dino as train
        train(args.out, **kw)


if __name__ == "__main__":
    main()
