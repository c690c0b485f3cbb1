"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet conditioned on its last
hidden states (epsilon or v-prediction, read from the scheduler config)."""

from __future__ import annotations

from typing import Sequence

import torch

from components.backbones.base import Backbone, register


def load_scheduler(source: str, revision: str | None):
    # Training uses the DDPM forward process; samplers build DDIM from the same config.
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)


def model_kwargs(revision, variant, torch_dtype) -> dict:
    kw = dict(revision=revision, variant=variant)
    return dict(kw, torch_dtype=torch_dtype) if torch_dtype else kw


def build_scheduler(config: dict, prediction_type: str):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type=prediction_type, **config)
    scheduler.register_to_config(set_alpha_to_one=False)  # read by DDIM, as in SD's own config
    return scheduler


def clip_text_config(tokenizer, config: dict, vocab_size: int | None = None):
    from transformers import CLIPTextConfig

    config = {"vocab_size": vocab_size or len(tokenizer), **config}  # a config may name the real vocabulary size
    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **config)


@register
class StableDiffusion(Backbone):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)

    #: Configs of the tiny preset: 32 px images, 8x8x4 latents, a 2-layer 32-wide text encoder.
    tiny_config = {
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

    def load(self, source, revision=None, variant=None, torch_dtype=None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from components.loader import DiffusionComponents

        kw = model_kwargs(revision, variant, torch_dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw)
        return DiffusionComponents(tokenizer, text_encoder, unet, vae, load_scheduler(source, revision),
                                   source=source, backbone=self)

    def build(self, config, prediction_type="epsilon", seed=0, source="", vocab_size=None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        from components.loader import DiffusionComponents
        from components.tokenizer import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, config["text_encoder"], vocab_size))
        unet = UNet2DConditionModel(**config["unet"])
        vae = AutoencoderKL(**config["vae"])
        for m in (text_encoder, unet, vae):
            m.eval()
        return DiffusionComponents(tokenizer, text_encoder, unet, vae, build_scheduler(config["scheduler"], prediction_type),
                                   source=source, backbone=self)

    def pipeline(self, components, scheduler):
        from diffusers import StableDiffusionPipeline

        c = components
        return StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def encode(self, components, prompts: Sequence[str]) -> torch.Tensor:
        from components.personalized import encode_text

        return encode_text(components.tokenizer, components.text_encoder, prompts)  # (B, L, D)

    def predict(self, components, latents, timesteps, cond):
        return components.unet(latents, timesteps, encoder_hidden_states=cond).sample
