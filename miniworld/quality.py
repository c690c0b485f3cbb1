"""Measure the MiniWorld models: ``python -m miniworld.quality [--model ...] [--clip ...] ...``.

Prints, for whichever models are given:

1. judge: accuracy of the attribute classifier on held-out renders (clean and through
   the VAE), so its verdicts below can be trusted;
2. model: prompt following of the text-to-image model. Prompts "a {colour} {shape}
   {scene}" with random attributes, one image each (DDIM, classifier-free guidance);
   the judge reads scene, shape and colour off every image (model_clip: the tiny
   CLIP's zero-shot reading of the same images, as a second opinion); model_pattern:
   the same with a pattern named, "a {colour} {pattern} {shape} {scene}" (striped,
   dotted, checkered), and ``identity`` (shape, colour and pattern all right);
   concepts_in_words: each held-out concept asked for in words in the 20 scenes ("a blue
   striped star on the beach"), its identity accuracy: what the base model draws of a
   concept when told, the ceiling personalization starts from; prompt_set: the
   25 study prompts with each shape word in the slot ("a star in the snow", "a red
   star", "a cube shaped star"), judged on what each one asks for;
3. clip: zero-shot retrieval on held-out images (right scene among the 20 scene
   captions; right shape / colour among captions differing in that word only);
4. dino: identity retrieval on held-out images (nearest neighbour has the same
   shape, colour and pattern) and mean cosine of same- vs different-identity pairs;
5. concepts: through the metrics' own backbone loaders, the mean cosine between views of
   each held-out concept (what CLIP-I / DINO give a perfect personalization) and between
   the concept and other objects of its superclass shape in the same scenes (what they
   give a model that draws only the superclass).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.pixels import SIGNED, from_uint8, to_uint8, unit_to_signed
from miniworld.data import rendered, to_tensor
from miniworld.judge import accuracy, load_judge, vae_roundtrip
from miniworld.scenes import SCENES
from miniworld.world import COLOUR_NAMES, SCENE_NAMES, SHAPE_NAMES

PRETRAINED = Path(__file__).with_name("pretrained")


def prompt_set(n: int, seed: int = 0) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``n`` prompts "a {colour} {shape} {scene}" and their ground-truth label indices."""
    rng = np.random.default_rng(seed)
    labels = {"scene": rng.integers(len(SCENE_NAMES), size=n), "shape": rng.integers(len(SHAPE_NAMES), size=n),
              "colour": rng.integers(len(COLOUR_NAMES), size=n)}
    prompts = [f"a {COLOUR_NAMES[c]} {SHAPE_NAMES[s]} {SCENES[SCENE_NAMES[sc]][0]}"
               for sc, s, c in zip(labels["scene"], labels["shape"], labels["colour"])]
    return prompts, {k: torch.from_numpy(v) for k, v in labels.items()}


def pattern_prompt_set(n: int, seed: int = 0) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``n`` prompts "a {colour} {pattern} {shape} {scene}" (a pattern other than plain, so
    that it is named) and their ground-truth label indices."""
    from miniworld.draw import PATTERNS
    from miniworld.world import ObjectSpec

    rng = np.random.default_rng([seed, 1])
    named = [k for k, p in enumerate(PATTERNS) if p != "plain"]
    labels = {"scene": rng.integers(len(SCENE_NAMES), size=n), "shape": rng.integers(len(SHAPE_NAMES), size=n),
              "colour": rng.integers(len(COLOUR_NAMES), size=n), "pattern": rng.choice(named, size=n)}
    prompts = [f"a {ObjectSpec(SHAPE_NAMES[s], COLOUR_NAMES[c], PATTERNS[p]).phrase()} {SCENES[SCENE_NAMES[sc]][0]}"
               for sc, s, c, p in zip(labels["scene"], labels["shape"], labels["colour"], labels["pattern"])]
    return prompts, {k: torch.from_numpy(np.asarray(v)) for k, v in labels.items()}


def concept_word_prompts() -> dict[str, list[str]]:
    """Per held-out concept, the concept asked for in words in each of the 20 scenes."""
    from miniworld.world import CONCEPTS

    return {name: [f"a {c.obj.phrase()} {SCENES[scene][0]}" for scene in SCENE_NAMES] for name, c in CONCEPTS.items()}


def identity_accuracy(pred: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    """Share of images whose shape, colour and pattern are all right."""
    right = torch.ones_like(truth["shape"], dtype=torch.bool)
    for k in ("shape", "colour", "pattern"):
        right &= pred[k] == truth[k]
    return float(right.float().mean())


def superclass_prompt_set() -> tuple[list[str], list[dict[str, int]]]:
    """The 25 prompts of :data:`PROMPTS` with each shape word in the slot (200 prompts),
    and what each one asks for: the scene (20 contexts) and the shape, or the colour
    ("a red {}"), the finish ("a shiny {}") or the shape ("a cube shaped {}")."""
    from miniworld.concepts import PROMPTS
    from miniworld.draw import FINISHES

    prompts, wanted = [], []
    for shape in SHAPE_NAMES:
        for k, template in enumerate(PROMPTS):
            prompts.append(template.format(shape))
            want = {"shape": SHAPE_NAMES.index(shape)}
            words = template.split()
            if k < len(SCENE_NAMES):  # a context ("a {} on top of pink fabric": pink is the scene's)
                want["scene"] = k
            else:  # an attribute change
                for c in set(words) & set(COLOUR_NAMES):
                    want["colour"] = COLOUR_NAMES.index(c)
                for f in set(words) & set(FINISHES):
                    want["finish"] = FINISHES.index(f)
                if "shaped" in words:
                    want["shape"] = SHAPE_NAMES.index(words[words.index("shaped") - 1])
            wanted.append(want)
    return prompts, wanted


@functools.lru_cache(maxsize=2)
def _pipeline(model_dir: str):
    """The diffusers pipeline of ``model_dir``, loaded once for all the prompt sets."""
    from components.loader import load_components

    pipe = load_components(model_dir).pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(model_dir: str, prompts: list[str], steps: int = 50, guidance: float = 5.0, seed: int = 0,
             batch_size: int = 50) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] from the diffusers pipeline of ``model_dir``."""
    pipe = _pipeline(model_dir)
    out = []
    for i in range(0, len(prompts), batch_size):
        gen = torch.Generator().manual_seed(seed + i)
        images = pipe(prompts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gen, output_type="pt").images  # (b, 3, H, W) in [0, 1]
        out.append(unit_to_signed(images))
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str, per_row: int = 10, scale: int = 3) -> None:
    from PIL import Image

    x = to_uint8(images, value_range=SIGNED)  # (N, H, W, 3)
    n = len(x) // per_row * per_row
    rows = [np.concatenate(list(x[i : i + per_row]), 1) for i in range(0, n, per_row)]
    sheet = np.concatenate(rows, 0)
    Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST).save(path)


def clip_opinion(clip_dir: str, images: torch.Tensor, truth: dict[str, torch.Tensor]) -> dict[str, float]:
    from transformers import AutoTokenizer, CLIPModel

    from miniworld.encoders import clip_zero_shot
    from miniworld.world import ObjectSpec

    objects = [ObjectSpec(SHAPE_NAMES[s], COLOUR_NAMES[c]) for s, c in zip(truth["shape"], truth["colour"])]
    scenes = [SCENE_NAMES[s] for s in truth["scene"]]
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    return clip_zero_shot(clip, AutoTokenizer.from_pretrained(clip_dir), images, objects, scenes)


def _fmt(key: str, value) -> str:
    """Accuracies as percentages, cosines with three decimals, settings as they are."""
    if not isinstance(value, float) or key == "guidance":
        return str(value)
    return f"{value:.3f}" if key.startswith(("cos", "clip_i", "dino")) else f"{100 * value:.1f}%"


@torch.no_grad()
def concept_separation(clip_dir: str, dino_dir: str, views: int = 10, seed: int = 0) -> dict[str, float]:
    """Mean over concepts of the cosine between concept views (first half vs second half)
    and between concept views and same-shape other objects, for CLIP-I and DINO."""
    from metrics import load_clip_backbone, load_dino_backbone
    from miniworld.world import CONCEPTS, World

    def batch(images):  # uint8 (H, W, 3) arrays -> (N, 3, H, W) in [0, 1], as the metrics take
        return torch.stack([from_uint8(im) for im in images])

    world, rng = World(seed), np.random.default_rng(seed)
    backbones = {"clip_i": load_clip_backbone(clip_dir), "dino": load_dino_backbone(dino_dir)}
    sums = {f"{k}_{w}": 0.0 for k in backbones for w in ("concept", "superclass")}
    for name, concept in CONCEPTS.items():
        samples = [world.render_concept(name, i) for i in range(views)]
        others = []
        for s in samples:  # another object of the same shape, in the same scene
            obj = world.random_object(rng)
            while obj.shape != concept.obj.shape:
                obj = world.random_object(rng)
            others.append(world.render(obj, s.scene, rng)[0])
        real, gen, sup = batch([s.image for s in samples[: views // 2]]), batch([s.image for s in samples[views // 2 :]]), batch(others)
        for k, b in backbones.items():
            ref = b.embed_images(real)
            sums[f"{k}_concept"] += float((ref @ b.embed_images(gen).T).mean()) / len(CONCEPTS)
            sums[f"{k}_superclass"] += float((ref @ b.embed_images(sup).T).mean()) / len(CONCEPTS)
    return sums


@dataclass
class QualityOptions:
    """Which MiniWorld models to measure, and how.

    Args:
        model: diffusers pipeline folder ('' to skip).
        judge: judge folder ('' to skip).
        clip: CLIP folder ('' to skip).
        dino: DINO folder ('' to skip).
        num_prompts: random prompts "a {colour} {shape} {scene}", one image each.
        num_held_out: held-out renders for the judge.
        steps: DDIM steps.
        guidance: classifier-free guidance scale.
        seed: seed of the prompts and the images.
        prompt_set: also judge the 25 study prompts x 8 shape words (old spelling: --prompt-set / --no-prompt-set).
        grid: also save the first samples as a PNG grid here.
        json: also write the figures to this JSON file.
    """

    model: str = str(PRETRAINED / "sd")
    judge: str = str(PRETRAINED / "judge")
    clip: str = str(PRETRAINED / "clip")
    dino: str = str(PRETRAINED / "dino")
    num_prompts: int = 200
    num_held_out: int = 2000
    steps: int = 50
    guidance: float = 5.0
    seed: int = 0
    prompt_set: bool = True
    grid: str = ""
    json: str = ""


def parse_options(argv: list[str] | None = None) -> QualityOptions:
    from components.cli import command_parser, parse_options as parse

    parser = command_parser(QualityOptions, prog="python -m miniworld.quality", description=__doc__)
    return parse(parser, QualityOptions, argv,
                 aliases={"--prompt-set": ["--prompt_set", "true"], "--no-prompt-set": ["--prompt_set", "false"]})


def main(argv: list[str] | None = None) -> dict:
    args = parse_options(argv)
    results: dict[str, dict] = {}

    judge = load_judge(args.judge) if args.judge else None
    if judge is not None:
        held = rendered(1, 2000) if args.num_held_out == 2000 else rendered(1, args.num_held_out, cache=False)
        x, y = to_tensor(held["images"]), torch.from_numpy(held["labels"]).long()
        results["judge_clean"] = accuracy(judge, x, y)
        vae_dir = Path(args.model) / "vae"
        if args.model and vae_dir.is_dir():
            from diffusers import AutoencoderKL

            results["judge_vae"] = accuracy(judge, vae_roundtrip(AutoencoderKL.from_pretrained(vae_dir).eval(), x, sample=False), y)

    if args.model and judge is not None:
        prompts, truth = prompt_set(args.num_prompts, args.seed)
        images = generate(args.model, prompts, args.steps, args.guidance, args.seed)
        pred = judge.predict(images)
        results["model"] = {k: float((pred[k] == truth[k]).float().mean()) for k in truth}
        results["model"].update(num_prompts=len(prompts), steps=args.steps, guidance=args.guidance)
        if args.clip:  # a second opinion: the tiny CLIP, zero-shot, on the same images
            results["model_clip"] = clip_opinion(args.clip, images, truth)
        if args.grid:
            save_grid(images[:50], args.grid)
        prompts, truth = pattern_prompt_set(args.num_prompts, args.seed)
        pred = judge.predict(generate(args.model, prompts, args.steps, args.guidance, args.seed))
        results["model_pattern"] = {k: float((pred[k] == truth[k]).float().mean()) for k in truth}
        results["model_pattern"]["identity"] = identity_accuracy(pred, truth)
        from miniworld.draw import PATTERNS
        from miniworld.world import CONCEPTS

        words, in_words = concept_word_prompts(), {}
        for name, prompts in words.items():
            obj = CONCEPTS[name].obj
            truth = {"shape": SHAPE_NAMES.index(obj.shape), "colour": COLOUR_NAMES.index(obj.colour),
                     "pattern": PATTERNS.index(obj.pattern)}
            pred = judge.predict(generate(args.model, prompts, args.steps, args.guidance, args.seed))
            in_words[name] = identity_accuracy(pred, {k: torch.full((len(prompts),), v) for k, v in truth.items()})
        in_words["mean"] = sum(in_words.values()) / len(words)
        results["concepts_in_words"] = in_words
        if args.prompt_set:  # the study's prompts, with the superclass word in the slot
            study_prompts, wanted = superclass_prompt_set()
            study_pred = judge.predict(generate(args.model, study_prompts, args.steps, args.guidance, args.seed))
            results["prompt_set"] = {
                k: float(np.mean([int(study_pred[k][i]) == w[k] for i, w in enumerate(wanted) if k in w]))
                for k in ("scene", "shape", "colour", "finish")
            }

    if args.clip:
        from transformers import AutoTokenizer, CLIPModel

        from miniworld.encoders import clip_retrieval

        clip = CLIPModel.from_pretrained(args.clip).eval()
        results["clip"] = clip_retrieval(clip, AutoTokenizer.from_pretrained(args.clip))

    if args.dino:
        from transformers import ViTModel

        from miniworld.encoders import dino_identity

        results["dino"] = dino_identity(ViTModel.from_pretrained(args.dino, add_pooling_layer=False).eval())

    if args.clip and args.dino:
        results["concepts"] = concept_separation(args.clip, args.dino)

    for section, figures in results.items():
        print(f"{section:12s} " + " ".join(f"{k} {_fmt(k, v)}" for k, v in figures.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    from components.errors import run_command

    run_command(main, prog="python -m miniworld.quality")
