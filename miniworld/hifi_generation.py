"""HiFi Tuner's generation algorithms measured on MiniWorld (issue 11).

    python -m miniworld.hifi_generation reference --artifact A --concept blue_striped_star --out DIR
    python -m miniworld.hifi_generation replace --artifact A --concept blue_striped_star --num-images 20 --out DIR

``reference``: reference-guided generation (Algorithm 2) against plain concept sampling
from the same x_T, on the 25 MiniWorld prompts: CLIP-I, CLIP-T, DINO (the world's encoders),
the judge's identity accuracy (shape, colour and pattern of the concept) and prompt
accuracy, and "scene kept": the judge reads the same scene on the guided image as on the
plain one. ``replace``: subject replacement (Algorithm 3) on held-out world images
(``World(1)``) that show an object of the concept's superclass and name it in the caption:
the judge's identity accuracy of the edited image, scene kept (the judge's scene equals
the source's), PSNR outside the source object's mask (the world's ground truth) against
the input image and against the null-text reconstruction. Both write ``results.json``
and a picture.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "miniworld" / "pretrained"


def _grid(rows: list[torch.Tensor], scale: int = 3):
    """Rows of (N, 3, H, W) images -> a PIL image, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    from components.pixels import tensor_to_pil

    pad = 2
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = torch.ones(3, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas[:, pad + i * (h + pad): pad + i * (h + pad) + h, pad + j * (w + pad): pad + j * (w + pad) + w] = im
    img = tensor_to_pil(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def reference(args) -> dict:
    from miniworld.sources import miniworld_concept_dir
    from lightning_modules.loading import check_model, load_model
    from metrics import ConceptMetrics
    from miniworld import PROMPTS
    from miniworld.judge import load_judge
    from miniworld.metrics import judge_predictions
    from samplers import build_sampler

    folder, superclass = miniworld_concept_dir(args.concept)
    check_model(None, [args.artifact], num_steps=args.num_steps)  # a broken artifact fails before anything loads
    model = load_model(None, args.artifact, device="cpu")  # as sample.py/evaluate.py/edit.py load, on the CPU
    templates = list(PROMPTS)[: args.num_prompts] if args.num_prompts else list(PROMPTS)
    metrics = ConceptMetrics(str(PRETRAINED / "clip"), str(PRETRAINED / "dino"), judge=str(PRETRAINED / "judge"))
    plain = build_sampler("concept", num_steps=args.num_steps, guidance=args.guidance)
    guided = build_sampler("reference_guided", num_steps=args.num_steps, base="concept",
                           base_settings={"guidance": args.guidance}, t_s=args.t_s, t_e=args.t_e,
                           inner_steps=args.inner_steps, lr=args.lr)
    guided.use_concept(folder)  # the concept's 5 views (and masks, captions from concept.json) are the references
    out = {"concept": args.concept, "artifact": str(args.artifact), "templates": len(templates),
           "num_images": args.num_images, "settings": guided.settings()}
    images = {}
    for name, sampler in (("plain", plain), ("reference_guided", guided)):
        t0 = time.time()
        metrics.set_concept(folder, superclass)
        parts, evals, steps = [], 0.0, 0.0
        for i in range(0, len(templates), args.batch_size):
            o = sampler.sample(model, templates[i : i + args.batch_size], num_images=args.num_images, seed=args.seed,
                               batch_size=args.batch_size)
            metrics.update(o.images, o.templates)
            parts.append(o.images)
            evals += o.cost["unet_evals_per_image"] * len(o.images)
            steps += o.cost.get("optimizer_steps_per_image", 0) * len(o.images)
        images[name] = torch.cat(parts)
        n = len(images[name])
        out[name] = {**{k: float(v) for k, v in metrics.compute().items()}, "unet_evals_per_image": evals / n,
                     "optimizer_steps_per_image": steps / n, "seconds": round(time.time() - t0, 1)}
        print(name, json.dumps(out[name]), flush=True)
    # scene kept: the judge reads the same scene on both images of a cell (same x_T)
    judge = load_judge(PRETRAINED / "judge")
    a, b = judge_predictions(judge, images["plain"]), judge_predictions(judge, images["reference_guided"])
    out["scene_kept"] = float((a["scene"] == b["scene"]).float().mean())
    k = args.figure_prompts * args.num_images
    images = {name: im[: k : args.num_images] for name, im in images.items()}
    out["figure_prompts"] = templates[: args.figure_prompts]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    _grid([images["plain"], images["reference_guided"]]).save(Path(args.out) / f"reference_{args.concept}.png")
    return out


def world_images(superclass: str, n: int, seed: int = 1):
    """The first n held-out world samples showing a ``superclass`` object named in the caption."""
    from miniworld.world import World

    world = World(seed)
    found, i = [], 0
    while len(found) < n and i < 20000:
        s = world.sample(i)
        if s.obj.shape == superclass and superclass in s.caption.split():
            found.append(s)
        i += 1
    return found


def replace(args) -> dict:
    from miniworld.sources import miniworld_concept_dir
    from editing.inversion import psnr
    from editing.replace import replace_subject
    from lightning_modules.loading import check_model, load_model
    from miniworld.concepts import read_concept_truth
    from miniworld.judge import load_judge
    from miniworld.metrics import judge_predictions
    from miniworld.world import COLOUR_NAMES, PATTERNS, SCENE_NAMES, SHAPE_NAMES
    from components.pixels import from_uint8

    folder, superclass = miniworld_concept_dir(args.concept)
    truth = read_concept_truth(folder)
    check_model(None, [args.artifact], num_steps=args.num_steps)  # a broken artifact fails before anything loads
    model = load_model(None, args.artifact, device="cpu")  # as sample.py/evaluate.py/edit.py load, on the CPU
    judge = load_judge(PRETRAINED / "judge")
    samples = world_images(superclass, args.num_images)
    rows, inputs, edits = [], [], []
    t0 = time.time()
    for k, s in enumerate(samples):
        image = from_uint8(s.image)  # (3, H, W) in [0, 1]
        mask = torch.from_numpy(s.mask)[None, None]
        r = replace_subject(model, image, s.caption, superclass, num_steps=args.num_steps, guidance=args.guidance,
                            inner_steps=args.inner_steps, lr=args.lr)
        pred = judge_predictions(judge, torch.stack([r.image, image]))
        ident = (int(pred["shape"][0]) == SHAPE_NAMES.index(truth.shape) and int(pred["colour"][0]) == COLOUR_NAMES.index(truth.colour)
                 and int(pred["pattern"][0]) == PATTERNS.index(truth.pattern))
        outside = ~mask
        rows.append({"caption": s.caption, "edit_prompt": r.edit_prompt, "identity": ident,
                     "shape_right": int(pred["shape"][0]) == SHAPE_NAMES.index(truth.shape),
                     "colour_right": int(pred["colour"][0]) == COLOUR_NAMES.index(truth.colour),
                     "pattern_right": int(pred["pattern"][0]) == PATTERNS.index(truth.pattern),
                     "caption_names_a_colour": any(c in s.caption.split() for c in COLOUR_NAMES),
                     "scene_kept": int(pred["scene"][0]) == SCENE_NAMES.index(s.scene),
                     "source_identity_read": int(pred["colour"][1]) == COLOUR_NAMES.index(s.obj.colour),
                     "psnr_outside_vs_input": psnr(r.image[None], image[None], outside),
                     "psnr_outside_vs_reconstruction": psnr(r.image[None], r.reconstruction[None], outside),
                     "psnr_reconstruction": psnr(r.reconstruction[None], image[None]), "cost": r.cost})
        inputs.append(image)
        edits.append(r.image)
        print(k, json.dumps(rows[-1]), flush=True)
    mean = lambda key: sum(float(r[key]) for r in rows) / max(len(rows), 1)  # noqa: E731
    out = {"concept": args.concept, "artifact": str(args.artifact), "num_images": len(rows),
           "settings": {"num_steps": args.num_steps, "guidance": args.guidance, "inner_steps": args.inner_steps,
                        "lr": args.lr},
           "identity": mean("identity"), "scene_kept": mean("scene_kept"), "shape_right": mean("shape_right"),
           "colour_right": mean("colour_right"), "pattern_right": mean("pattern_right"),
           "psnr_outside_vs_input": mean("psnr_outside_vs_input"),
           "psnr_outside_vs_reconstruction": mean("psnr_outside_vs_reconstruction"),
           "psnr_reconstruction": mean("psnr_reconstruction"), "seconds": round(time.time() - t0, 1),
           "unet_evals_per_image": rows[0]["cost"]["unet_evals_per_image"] if rows else 0,
           "optimizer_steps_per_image": mean_cost(rows, "optimizer_steps_per_image"), "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    m = args.figure_images
    _grid([torch.stack(inputs[:m]), torch.stack(edits[:m])]).save(Path(args.out) / f"replace_{args.concept}.png")
    return out


def mean_cost(rows, key):
    return sum(r["cost"][key] for r in rows) / max(len(rows), 1)


@dataclass
class _Common:
    """Options both commands take.

    Args:
        artifact: the trained artifact folder.
        concept: the MiniWorld concept it was trained on.
        out: output folder (results JSON and picture).
        num_steps: DDIM steps.
        guidance: classifier-free guidance.
        seed: random seed (of the latents, for reference-guided generation).
    """

    artifact: str
    concept: str
    out: str
    num_steps: int = 25
    guidance: float = 7.5
    seed: int = 0


@dataclass
class Reference(_Common):
    """Reference-guided generation (Algorithm 2) against plain concept sampling.

    Args:
        inner_steps: J, Adam steps per guided timestep.
        t_s: guidance starts at this step of num_steps (paper: 40 of 50).
        t_e: and ends at this one (paper: 10 of 50).
        lr: Adam lr of the guidance.
        num_prompts: the first N MiniWorld prompts (0: all 25).
        num_images: images per prompt.
        batch_size: prompts per sampler call.
        figure_prompts: prompts in the picture.
    """

    inner_steps: int = 10
    t_s: int = 20
    t_e: int = 5
    lr: float = 1e-2
    num_prompts: int = 0
    num_images: int = 1
    batch_size: int = 25
    figure_prompts: int = 8


@dataclass
class Replace(_Common):
    """Subject replacement (Algorithm 3) on held-out world images.

    Args:
        inner_steps: K, null-text optimization steps per timestep.
        lr: null-text lr (MiniWorld: 5e-2; Mokady et al.: 1e-2).
        num_images: held-out world images edited.
        figure_images: images in the picture.
    """

    inner_steps: int = 10
    lr: float = 5e-2
    num_images: int = 20
    figure_images: int = 8


COMMANDS = {"reference": (Reference, "reference-guided generation (Algorithm 2) against plain concept sampling"),
            "replace": (Replace, "subject replacement (Algorithm 3) on held-out world images")}


def main(argv=None):
    from components.cli import parse_subcommand, subcommands_parser

    parser = subcommands_parser("python -m miniworld.hifi_generation", __doc__, COMMANDS)
    command, args = parse_subcommand(parser, COMMANDS, argv)
    torch.manual_seed(0)
    result = reference(args) if command == "reference" else replace(args)
    path = Path(args.out) / f"{command}_{args.concept}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
