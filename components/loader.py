"""One loader for the five components of a Stable-Diffusion-family model.

``load_components(source)`` takes a diffusers pipeline folder, a hub id (SD 1.x / 2.x,
epsilon or v-prediction: read from the scheduler config), or ``"tiny"`` / ``"tiny-v"``:
the tiny preset, built offline from configs, written once as a standard diffusers
pipeline folder in a cache directory and then loaded from there like any real model.
So the code that loads ``stabilityai/stable-diffusion-2-base`` is the code the tests run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from components.tokenizer import build_tiny_tokenizer

TINY_PRESETS = ("tiny", "tiny-v")
CACHE_ENV = "PERSONALIZE_CACHE"


@dataclass
class DiffusionComponents:
    """Tokenizer, text encoder, UNet, VAE and training noise scheduler of one model."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    source: str = field(default="")

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the UNet was built for (``sample_size`` × VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def ddim_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.scheduler.config)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}

    def to(self, device=None, dtype=None) -> "DiffusionComponents":
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        return self

    def pipeline(self, **kwargs):
        """A diffusers ``StableDiffusionPipeline`` sharing these modules."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=kwargs.pop("scheduler", self.ddim_scheduler()),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **kwargs,
        )

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write a standard diffusers pipeline folder (``model_index.json`` and one
        subfolder per component) that ``StableDiffusionPipeline.from_pretrained`` and
        :func:`load_components` both read."""
        folder = Path(folder)
        self.pipeline(scheduler=self.scheduler).save_pretrained(folder, safe_serialization=True)
        return folder


def load_components(
    source: str | os.PathLike = "tiny",
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> DiffusionComponents:
    """Load the components from a pipeline folder, a hub id, or a tiny preset name."""
    source = str(source)
    if source in TINY_PRESETS:
        folder = tiny_preset_folder(prediction_type="v_prediction" if source == "tiny-v" else "epsilon")
        return load_components(folder, torch_dtype=torch_dtype)
    if not Path(source).exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(
            f"Model folder {source!r} does not exist. Pass a diffusers pipeline folder "
            f"(with model_index.json), a hub id such as 'stabilityai/stable-diffusion-2-base', "
            f"or one of the presets {TINY_PRESETS}."
        )
    if Path(source).is_dir() and not (Path(source) / "model_index.json").exists():
        raise FileNotFoundError(
            f"{source!r} is a folder but not a diffusers pipeline folder: model_index.json is missing. "
            "Save a model with StableDiffusionPipeline.save_pretrained(folder) or "
            "DiffusionComponents.save_pretrained(folder)."
        )
    kw = dict(revision=revision)
    model_kw = dict(kw, variant=variant, torch_dtype=torch_dtype) if torch_dtype else dict(kw, variant=variant)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **model_kw)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **model_kw)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **model_kw)
    # Training uses the DDPM forward process; samplers build DDIM from the same config.
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    return DiffusionComponents(tokenizer, text_encoder, unet, vae, scheduler, source=source)


# --------------------------------------------------------------------------- tiny preset

#: Configs of the tiny preset: 32 px images, 8x8x4 latents, a 2-layer 32-wide text encoder.
TINY_CONFIG = {
    "text_encoder": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
    ),
    "unet": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 32), sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    ),
    "scheduler": dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1, timestep_spacing="leading",
    ),
}


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
                     source: str = "") -> DiffusionComponents:
    """Build components from a config like :data:`TINY_CONFIG` with seeded random weights
    (the tiny tokenizer; ``vocab_size`` can make the embedding table larger than it)."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(
        vocab_size=vocab_size or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config["text_encoder"],
    )
    text_encoder = CLIPTextModel(text_cfg)
    unet = UNet2DConditionModel(**config["unet"])
    vae = AutoencoderKL(**config["vae"])
    scheduler = DDPMScheduler(prediction_type=prediction_type, **config["scheduler"])
    scheduler.register_to_config(set_alpha_to_one=False)  # read by DDIM, as in SD's own config
    for m in (text_encoder, unet, vae):
        m.eval()
    return DiffusionComponents(tokenizer, text_encoder, unet, vae, scheduler, source=source)


def build_tiny_components(prediction_type: str = "epsilon", seed: int = 0) -> DiffusionComponents:
    """Build the tiny preset in memory with seeded random weights."""
    return build_components(TINY_CONFIG, prediction_type, seed, source="tiny")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "personalize"))


def tiny_preset_folder(prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """The tiny preset as a diffusers pipeline folder, written once and reused.

    The folder name hashes the configs and the word list, so a change to either writes a
    new folder instead of reading a stale one.
    """
    from components.tokenizer import WORDS_FILE

    key = json.dumps([TINY_CONFIG, prediction_type, seed, WORDS_FILE.read_text()], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = cache_dir() / f"tiny-sd-{prediction_type}-{digest}"
    if not (folder / "model_index.json").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
            build_tiny_components(prediction_type, seed).save_pretrained(tmp)
        try:
            tmp.rename(folder)  # atomic: concurrent builders never see a half-written folder
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
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
