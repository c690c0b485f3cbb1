"""One loader for the components of a diffusion model, whatever its family.

``load_components(source)`` takes a diffusers pipeline folder, a hub id, or a preset
name: ``"tiny"`` / ``"tiny-v"`` (SD layout, epsilon / v-prediction), ``"tiny-sdxl"``,
``"tiny-pixart"``. The folder's ``model_index.json`` names its pipeline class, which picks
the backbone (``components/backbones/``: SD 1.x/2.x, SD-XL, PixArt-α); the backbone loads
the components. A preset is built offline from configs with random weights, written once
as a standard diffusers pipeline folder in a cache directory and then loaded from there
like any real model, so the code that loads ``stabilityai/stable-diffusion-xl-base-1.0``
is the code the tests run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

from components.backbones import BACKBONES, Backbone, backbone_for_pipeline
from components.errors import MissingFileError, UserError

#: preset name -> (backbone name, prediction type)
PRESETS = {
    "tiny": ("sd", "epsilon"),
    "tiny-v": ("sd", "v_prediction"),
    "tiny-sdxl": ("sdxl", "epsilon"),
    "tiny-pixart": ("pixart-alpha", "epsilon"),
}
TINY_PRESETS = tuple(PRESETS)
CACHE_ENV = "PERSONALIZE_CACHE"


@dataclass
class DiffusionComponents:
    """Tokenizer(s), text encoder(s), denoiser, VAE and training noise scheduler of one model.

    ``unet`` holds the denoiser whatever its kind (a ``UNet2DConditionModel``, or
    PixArt-α's ``PixArtTransformer2DModel``; also reachable as ``denoiser``);
    ``tokenizer_2`` / ``text_encoder_2`` are SD-XL's second CLIP encoder (None
    elsewhere). ``backbone`` knows how they fit together (components.backbones).
    """

    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    source: str = field(default="")
    tokenizer_2: Any = None
    text_encoder_2: torch.nn.Module | None = None
    backbone: Backbone | None = None

    def __post_init__(self):
        if self.backbone is None:
            self.backbone = BACKBONES["sd"]()

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the denoiser was built for (``sample_size`` × VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def ddim_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.scheduler.config)

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """``{"text_encoder": ..., "text_encoder_2": ...}``: the text encoders present."""
        return {n: getattr(self, n) for n in ("text_encoder", "text_encoder_2") if getattr(self, n) is not None}

    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    def modules(self) -> dict[str, torch.nn.Module]:
        return {**self.text_encoders(), "unet": self.unet, "vae": self.vae}

    def to(self, device=None, dtype=None) -> "DiffusionComponents":
        # only the arguments given: diffusers warns on any dtype keyword, even None
        move = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in self.modules().values():
            m.to(**move)
        return self

    def encode(self, prompts) -> Any:
        """The denoiser's conditioning for fully written prompts (see Backbone.encode)."""
        return self.backbone.encode(self, prompts)

    def predict(self, latents: torch.Tensor, timesteps, cond) -> torch.Tensor:
        """The denoiser's prediction for latents under a conditioning (see Backbone.predict)."""
        return self.backbone.predict(self, latents, timesteps, cond)

    def pipeline(self, scheduler=None):
        """The family's diffusers pipeline (``StableDiffusionPipeline``,
        ``StableDiffusionXLPipeline``, ``PixArtAlphaPipeline``) sharing these modules
        (a DDIM scheduler from the model's config unless one is given)."""
        return self.backbone.pipeline(self, scheduler or self.ddim_scheduler())

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write a standard diffusers pipeline folder (``model_index.json`` and one
        subfolder per component) that the family's pipeline and :func:`load_components`
        both read."""
        folder = Path(folder)
        self.pipeline(scheduler=self.scheduler).save_pretrained(folder, safe_serialization=True)
        return folder


def load_components(
    source: str | os.PathLike = "tiny",
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> DiffusionComponents:
    """Load the components from a pipeline folder, a hub id, or a preset name."""
    source = str(source)
    if source in PRESETS:
        backbone, prediction_type = PRESETS[source]
        return load_components(preset_folder(backbone, prediction_type), torch_dtype=torch_dtype)
    check_model_source(source)  # a typo, a non-pipeline folder or an unreachable hub id: a UserError now
    index = read_model_index(source, revision)
    backbone = backbone_for_pipeline(index.get("_class_name", "")).from_model_index(index)
    return backbone.load(source, revision=revision, variant=variant, torch_dtype=torch_dtype)


def read_model_index(source: str, revision: str | None = None) -> dict:
    """``model_index.json`` of a pipeline folder or hub id."""
    if Path(source).is_dir():
        return json.loads((Path(source) / "model_index.json").read_text())
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(source, revision=revision))


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_model_source(source: str, probe_timeout: float = 3.0) -> str:
    """Check a base model name in seconds, before anything loads: ``"preset"``, ``"folder"``
    (a diffusers pipeline folder), ``"hub"`` (a hub id, network reachable) or ``"cached"``
    (a hub id in the local Hugging Face cache while offline). Anything else is a :class:`UserError` naming the fix: a name that
    is neither a folder, a preset nor a hub id; a hub id while offline (``HF_HUB_OFFLINE``
    or no network) that is not in the cache."""
    source = str(source)
    if source in TINY_PRESETS:
        return "preset"
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise MissingFileError(f"{source!r} is not a diffusers pipeline folder: model_index.json is missing",
                                   fix="save one with StableDiffusionPipeline.save_pretrained(folder), or pass a "
                                       f"hub id or a preset ({', '.join(TINY_PRESETS)})")
        return "folder"
    if not HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise MissingFileError(f"model {source!r} does not exist: it is neither a folder, a preset "
                               f"({', '.join(TINY_PRESETS)}) nor a hub id (owner/name)",
                               fix="pass a diffusers pipeline folder, a preset, or a hub id such as "
                                   "stabilityai/stable-diffusion-2-base")
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(source, "model_index.json"), str)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not offline and _hub_reachable(probe_timeout):
        return "hub"
    if cached:
        return "cached"
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached (no network)"
    raise UserError(f"model {source!r} is not in the local Hugging Face cache and {why}",
                    fix="download it where there is network (huggingface-cli download " + source + "), or pass "
                        "a local diffusers pipeline folder (StableDiffusionPipeline.save_pretrained)")


def num_train_timesteps(source: str) -> int | None:
    """The training timesteps T of a model's scheduler, read from its config file without
    loading the model (None where the config is not on disk: a hub id not downloaded)."""
    source = str(source)
    if source in PRESETS:
        path = preset_folder(*PRESETS[source]) / "scheduler" / "scheduler_config.json"
    elif Path(source).expanduser().is_dir():
        path = Path(source).expanduser() / "scheduler" / "scheduler_config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "scheduler_config.json", subfolder="scheduler")
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text()).get("num_train_timesteps", 1000))
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} is damaged ({err})", fix="save or download the model again") from err


def check_num_steps(source: str, num_steps: int, what: str = "num_steps") -> None:
    """A UserError when a sampler's DDIM steps exceed the model's training timesteps."""
    total = num_train_timesteps(source)
    if total is not None and num_steps > total:
        raise UserError(f"{what}={num_steps} is more than the {total} training timesteps of {source}",
                        fix=f"choose num_steps of at most {total} (50 is the usual choice)")


def _hub_reachable(timeout: float) -> bool:
    """Whether the hub's host accepts a TCP connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- presets

#: Configs of the tiny SD preset: 32 px images, 8x8x4 latents, a 2-layer 32-wide text encoder.
TINY_CONFIG = BACKBONES["sd"].tiny_config


#: Stable Diffusion 2 base sized architecture (random weights: benchmarks at real size).
SD2_BASE_CONFIG = {
    "text_encoder": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, projection_dim=512, hidden_act="gelu",
    ),
    "unet": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ),
    "scheduler": TINY_CONFIG["scheduler"],
}


def build_components(config: dict, prediction_type: str = "epsilon", seed: int = 0, vocab_size: int | None = None,
                     source: str = "", backbone: str = "sd") -> DiffusionComponents:
    """Build components from a config like :data:`TINY_CONFIG` with seeded random weights
    (the tiny tokenizer; ``vocab_size`` can make an SD text encoder's embedding table larger)."""
    kw = {"vocab_size": vocab_size} if vocab_size else {}
    return BACKBONES[backbone]().build(config, prediction_type, seed, source=source, **kw)


def build_tiny_components(prediction_type: str = "epsilon", seed: int = 0, backbone: str = "sd") -> DiffusionComponents:
    """Build a tiny preset in memory with seeded random weights."""
    cls = BACKBONES[backbone]
    return cls().build(cls.tiny_config, prediction_type, seed, source="tiny" if backbone == "sd" else f"tiny-{backbone}")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "personalize"))


def tiny_preset_folder(prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """The tiny SD preset as a diffusers pipeline folder, written once and reused."""
    return preset_folder("sd", prediction_type, seed)


def preset_folder(backbone: str = "sd", prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny preset as a diffusers pipeline folder, written once and reused.

    The folder name hashes the configs and the word list, so a change to either writes a
    new folder instead of reading a stale one.
    """
    from components.tokenizer import WORDS_FILE

    config = BACKBONES[backbone].tiny_config
    key = json.dumps([config, prediction_type, seed, WORDS_FILE.read_text()], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = cache_dir() / f"tiny-{backbone}-{prediction_type}-{digest}"
    if not (folder / "model_index.json").exists():
        from components.atomic import atomic_path

        # building must not move the caller's RNG; concurrent builders: the first one wins
        with atomic_path(folder, replace=False) as tmp, torch.random.fork_rng(devices=[]):
            build_tiny_components(prediction_type, seed, backbone).save_pretrained(tmp)
    return folder


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A floating dtype from its name (``float32``, ``bf16``, ...) or itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    value = getattr(torch, names.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: choose float32, bfloat16 or float16.")
    return value
