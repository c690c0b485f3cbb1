"""Stable Diffusion XL: two CLIP text encoders and a UNet with micro-conditioning.

As diffusers' ``StableDiffusionXLPipeline`` does it:

- hidden states: the penultimate hidden states of ``text_encoder`` (CLIP ViT-L) and
  ``text_encoder_2`` (OpenCLIP bigG), concatenated, (B, 77, 768 + 1280);
- ``text_embeds``: the pooled, projected output of ``text_encoder_2``, (B, 1280);
- ``time_ids``: (original size, crop top-left, target size) = (H, W, 0, 0, H, W), taken
  here from the size of the latents being denoised (the pipeline's default, and what
  training at a fixed resolution on resized, centre-cropped images gives);
- the empty prompt is all zeros (hidden states and pooled embedding) when the pipeline's
  ``force_zeros_for_empty_prompt`` says so (SD-XL base 1.0 does), as the pipeline does
  for classifier-free guidance without a negative prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch

from components.backbones.base import Backbone, register
from components.backbones.sd import StableDiffusion, build_scheduler, clip_text_config, load_scheduler, model_kwargs
from components.conditioning import Conditioning


@register
class StableDiffusionXL(Backbone):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    pipeline_options = {"force_zeros_for_empty_prompt": True}

    #: tiny preset: two 32-wide CLIP encoders (64-wide context), a 2-level UNet with
    #: ``text_time`` added conditioning, 32 px images
    tiny_config = {
        "text_encoder": StableDiffusion.tiny_config["text_encoder"],
        "text_encoder_2": dict(StableDiffusion.tiny_config["text_encoder"], projection_dim=32),
        "unet": dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), cross_attention_dim=64,
            projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
        ),
        "vae": dict(StableDiffusion.tiny_config["vae"], scaling_factor=0.13025),
        "scheduler": StableDiffusion.tiny_config["scheduler"],
    }

    def load(self, source, revision=None, variant=None, torch_dtype=None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from components.loader import DiffusionComponents

        kw = model_kwargs(revision, variant, torch_dtype)
        return DiffusionComponents(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw),
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **kw),
            scheduler=load_scheduler(source, revision),
            source=source,
            tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", revision=revision),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kw),
            backbone=self,
        )

    def build(self, config, prediction_type="epsilon", seed=0, source=""):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from components.loader import DiffusionComponents
        from components.tokenizer import build_tiny_tokenizer

        tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, config["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, config["text_encoder_2"]))
        unet = UNet2DConditionModel(**config["unet"])
        vae = AutoencoderKL(**config["vae"])
        for m in (text_encoder, text_encoder_2, unet, vae):
            m.eval()
        return DiffusionComponents(tokenizer, text_encoder, unet, vae, build_scheduler(config["scheduler"], prediction_type),
                                   source=source, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2, backbone=self)

    def pipeline(self, components, scheduler):
        from diffusers import StableDiffusionXLPipeline

        c = components
        return StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=scheduler, add_watermarker=False,
            force_zeros_for_empty_prompt=self.options["force_zeros_for_empty_prompt"],
        )

    def encode(self, components, prompts: Sequence[str]) -> Conditioning:
        return self._encode(components, prompts, self.options["force_zeros_for_empty_prompt"])

    def encode_text_rows(self, components, prompts: Sequence[str]) -> Conditioning:
        return self._encode(components, prompts, zero_empty=False)

    def _encode(self, components, prompts: Sequence[str], zero_empty: bool) -> Conditioning:
        from components.personalized import tokenize

        c = components
        states, pooled = [], None
        for tokenizer, encoder in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            device = next(encoder.parameters()).device
            out = encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (B, 77, D_i): penultimate layer
            pooled = out[0]  # the last encoder's pooled, projected embedding (B, P)
        hidden = torch.cat(states, dim=-1)  # (B, 77, D_1 + D_2)
        if zero_empty:
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return Conditioning(hidden, {"text_embeds": pooled})

    def pipeline_inputs(self, cond, negative) -> dict:
        return {"prompt_embeds": cond.hidden_states, "pooled_prompt_embeds": cond.extras["text_embeds"],
                "negative_prompt_embeds": negative.hidden_states,
                "negative_pooled_prompt_embeds": negative.extras["text_embeds"]}

    def predict(self, components, latents, timesteps, cond):
        h, w = (s * components.vae_scale_factor for s in latents.shape[-2:])  # image size
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=latents.device, dtype=cond.dtype)  # (6,)
        added = {"text_embeds": cond.extras["text_embeds"], "time_ids": time_ids.expand(latents.shape[0], -1)}
        return components.unet(latents, timesteps, encoder_hidden_states=cond.hidden_states, added_cond_kwargs=added).sample
