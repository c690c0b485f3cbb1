"""Edit images with a personalized model: HiFi Tuner's personalized subject replacement.

    python edit.py replace --image in.png --caption "a red ball on the beach" --word ball \\
        --artifact outputs/x/artifact --out out.png

Algorithm 3 (HiFi Tuner, §3.4): the image is inverted under its caption (DDIM inversion +
null-text optimization), then denoised again with the caption's subject word replaced by
the artifact's concept phrase (HiFi Tuner: its step-wise c_s^t), every other token's
cross-attention replayed from the source pass (prompt-to-prompt). Works with any
artifact that has a concept phrase (HiFi Tuner, DreamBooth, Textual Inversion, ...) on
Stable Diffusion 1.x/2.x and MiniWorld models. Bad input (a word not in the caption, an
unreadable image, an artifact without a concept phrase) is refused before any model
loads; ``--debug`` (or ``PERSONALIZE_DEBUG=1``) shows a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from components.errors import MissingFileError, UserError

PROG = "edit.py"


@dataclass
class ReplaceOptions:
    """Personalized subject replacement (HiFi Tuner, Algorithm 3).

    Args:
        image: the input image (png, jpg, webp); resized to the model's resolution.
        caption: what the image shows, e.g. 'a red ball on the beach'.
        word: the caption's word naming the subject to replace, e.g. 'ball'.
        artifact: artifact folder of a fine-tuning method (personalize.json inside).
        out: output PNG.
        model: base model (default: the one the artifact was trained on).
        num_steps: DDIM steps (paper: 50).
        guidance: classifier-free guidance ω (null-text inversion: 7.5).
        inner_steps: K, null-text optimization steps per timestep (10).
        lr: null-text optimization's Adam lr, decayed by (1 - i/100) (Mokady et al.: 1e-2; the MiniWorld model
            needs about 5e-2 at 25 steps).
        device: cpu, cuda, ... (default: cuda if available).
        save_reconstruction: also write <out>_reconstruction.png (the null-text reconstruction of the input).
    """

    image: str
    caption: str
    word: str
    artifact: str
    out: str
    model: str | None = None
    num_steps: int = 50
    guidance: float = 7.5
    inner_steps: int = 10
    lr: float = 1e-2
    device: str | None = None
    save_reconstruction: bool = False


COMMANDS = {"replace": (ReplaceOptions, "replace the subject of an image with the personalized concept (HiFi Tuner, "
                                        "Alg. 3)")}


def parse(argv: list[str] | None = None) -> tuple[str, ReplaceOptions]:
    """(command, its options); the old spellings (--num-steps, --save-reconstruction) kept."""
    from components.cli import parse_subcommand, subcommands_parser

    parser = subcommands_parser(PROG, "Edit images with a personalized model.", COMMANDS)
    return parse_subcommand(parser, COMMANDS, argv, aliases={"--save-reconstruction": ["--save_reconstruction", "true"]})


def read_image(path: str):
    """(3, H, W) float in [0, 1]; UserError if it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    from components.pixels import to_rgb

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"--image {path} does not exist", fix="pass the path of a png, jpg or webp image")
    try:
        with Image.open(p) as im:
            im.load()
            rgb = to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"--image {path} is not a readable image ({err})", fix="pass a png, jpg or webp image") from err
    from components.pixels import pil_to_tensor

    return pil_to_tensor(rgb)


def check_artifact(folder: str) -> dict:
    """The artifact's manifest, with a concept phrase (UserError otherwise)."""
    from lightning_modules.base import read_artifact_manifest  # lazy: Lightning is heavy to import

    manifest = read_artifact_manifest(folder)
    phrase = manifest.get("concept_phrase") or " ".join(f"{manifest['placeholder']} {manifest['superclass']}".split())
    if not str(phrase).strip() or not str(manifest.get("placeholder", "")).strip():
        raise UserError(f"artifact {folder} has no concept phrase (placeholder {manifest.get('placeholder')!r}, superclass "
                        f"{manifest.get('superclass')!r})", fix="use an artifact trained with a placeholder word, e.g. sks")
    return manifest


def replace(args) -> Path:
    from editing.replace import caption_template

    if args.num_steps < 1 or args.inner_steps < 0 or args.guidance < 0 or not args.lr > 0:
        raise UserError("--num-steps must be >= 1, --inner-steps and --guidance >= 0, --lr > 0",
                        fix="e.g. --num-steps 50 --inner-steps 10 --guidance 7.5 --lr 0.01")
    caption_template(args.caption, args.word)  # the word is in the caption
    image = read_image(args.image)
    manifest = check_artifact(args.artifact)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must be a .png file", fix="e.g. --out out.png")
    from lightning_modules.loading import check_model, load_model, resolve_device

    check_model(args.model, [args.artifact], args.num_steps)

    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from editing.replace import replace_subject

    device = resolve_device(args.device)
    print(f"loading {args.artifact} ...")
    model = load_model(args.model, args.artifact, device=device)
    size = model.components.unet.config.sample_size * 2 ** (len(model.components.vae.config.block_out_channels) - 1)
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=stage, unit="step")
        bars[stage].update(done - bars[stage].n)

    result = replace_subject(model, image.to(device), args.caption, args.word, num_steps=args.num_steps,
                             guidance=args.guidance, inner_steps=args.inner_steps, lr=args.lr, progress=progress)
    for bar in bars.values():
        bar.close()
    from sample import save_png

    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(result.image, out)
    if args.save_reconstruction:
        save_png(result.reconstruction, out.with_name(out.stem + "_reconstruction.png"))
    print(json.dumps({"out": str(out), "source_prompt": result.source_prompt, "edit_prompt": result.edit_prompt,
                      "cost": result.cost}))
    return out


def main(argv: list[str] | None = None):
    command, args = parse(argv)
    if command == "replace":
        return replace(args)


if __name__ == "__main__":
    from components.errors import run_command

    run_command(main, prog="edit.py")
