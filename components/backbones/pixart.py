"""PixArt-α: a T5 text encoder and a DiT (``PixArtTransformer2DModel``) with
cross-attention in every block.

As diffusers' ``PixArtAlphaPipeline`` does it:

- prompts are tokenized to ``max_sequence_length`` = 120 T5 tokens (the loaded
  tokenizer's ``model_max_length`` is set to it, so token positions and the
  cross-attention key length agree); the T5 output is the hidden states and the
  tokenizer's attention mask goes to the transformer as ``encoder_attention_mask``;
- the empty prompt is encoded like any other (PixArt has no zeroed negative);
- ``added_cond_kwargs``: resolution and aspect ratio of the image for the models that
  use them (the 1024 px ones: the transformer's ``use_additional_conditions``), taken
  from the size of the latents being denoised; none for the 512 px model;
- learned variance: the transformer outputs 2×C channels (ε and the variance); the
  first C are the prediction, as the pipeline keeps them. Training fits those first C
  channels only (the variance half gets no gradient), as diffusers' PixArt fine-tuning
  scripts do.
"""

from __future__ import annotations

from typing import Sequence

import torch

from components.backbones.base import Backbone, register
from components.backbones.sd import StableDiffusion, build_scheduler, load_scheduler, model_kwargs
from components.conditioning import Conditioning

MAX_SEQUENCE_LENGTH = 120  # PixArtAlphaPipeline's max_sequence_length


@register
class PixArtAlpha(Backbone):
    name = "pixart-alpha"
    pipeline_classes = ("PixArtAlphaPipeline",)
    denoiser_name = "transformer"

    #: tiny preset: a 2-layer 32-wide T5 encoder, a 2-block DiT (patch 2, learned sigma), 32 px images
    tiny_config = {
        "text_encoder": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                             dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False),
        "transformer": dict(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
            in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        ),
        "vae": StableDiffusion.tiny_config["vae"],
        "scheduler": dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                          clip_sample=False, steps_offset=1, timestep_spacing="leading"),
    }

    def load(self, source, revision=None, variant=None, torch_dtype=None):
        from diffusers import AutoencoderKL, PixArtTransformer2DModel
        from transformers import T5EncoderModel, T5Tokenizer

        from components.loader import DiffusionComponents

        kw = model_kwargs(revision, variant, torch_dtype)
        tokenizer = T5Tokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
        tokenizer.model_max_length = MAX_SEQUENCE_LENGTH
        return DiffusionComponents(
            tokenizer=tokenizer,
            text_encoder=T5EncoderModel.from_pretrained(source, subfolder="text_encoder", **kw),
            unet=PixArtTransformer2DModel.from_pretrained(source, subfolder="transformer", **kw),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **kw),
            scheduler=load_scheduler(source, revision),
            source=source,
            backbone=self,
        )

    def build(self, config, prediction_type="epsilon", seed=0, source=""):
        from diffusers import AutoencoderKL, PixArtTransformer2DModel
        from transformers import T5Config, T5EncoderModel

        from components.loader import DiffusionComponents
        from components.tokenizer import build_tiny_t5_tokenizer

        tokenizer = build_tiny_t5_tokenizer(model_max_length=MAX_SEQUENCE_LENGTH)
        torch.manual_seed(seed)
        text_config = {"vocab_size": len(tokenizer), **config["text_encoder"]}  # a config may name the real size
        text_encoder = T5EncoderModel(T5Config(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                               **text_config))
        transformer = PixArtTransformer2DModel(**config["transformer"])
        vae = AutoencoderKL(**config["vae"])
        for m in (text_encoder, transformer, vae):
            m.eval()
        return DiffusionComponents(tokenizer, text_encoder, transformer, vae,
                                   build_scheduler(config["scheduler"], prediction_type), source=source, backbone=self)

    def pipeline(self, components, scheduler):
        from diffusers import PixArtAlphaPipeline

        c = components
        return PixArtAlphaPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, transformer=c.unet,
                                   scheduler=scheduler)

    def encode(self, components, prompts: Sequence[str]) -> Conditioning:
        tokenizer, encoder = components.tokenizer, components.text_encoder
        device = next(encoder.parameters()).device
        tokens = tokenizer(list(prompts), padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)  # (B, 120) each
        hidden = encoder(ids, attention_mask=mask)[0]  # (B, 120, D)
        return Conditioning(hidden, {"encoder_attention_mask": mask})

    def pipeline_inputs(self, cond, negative) -> dict:
        return {"prompt_embeds": cond.hidden_states, "prompt_attention_mask": cond.extras["encoder_attention_mask"],
                "negative_prompt_embeds": negative.hidden_states,
                "negative_prompt_attention_mask": negative.extras["encoder_attention_mask"],
                "negative_prompt": None, "use_resolution_binning": False}

    def predict(self, components, latents, timesteps, cond):
        transformer, n, channels = components.unet, latents.shape[0], latents.shape[1]
        t = torch.as_tensor(timesteps, device=latents.device)
        t = (t[None] if t.ndim == 0 else t).expand(n)  # (B,)
        added = {"resolution": None, "aspect_ratio": None}
        if transformer.use_additional_conditions:  # the 1024 px models
            h, w = (s * components.vae_scale_factor for s in latents.shape[-2:])
            added = {"resolution": torch.tensor([[h, w]], dtype=cond.dtype, device=latents.device).expand(n, -1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=cond.dtype, device=latents.device).expand(n, -1)}
        out = transformer(latents, encoder_hidden_states=cond.hidden_states,
                          encoder_attention_mask=cond.extras["encoder_attention_mask"], timestep=t,
                          added_cond_kwargs=added).sample  # (B, C or 2C, h, w)
        if out.shape[1] == 2 * channels:  # learned sigma: keep ε (the first C channels)
            out = out[:, :channels]
        return out

    def max_length(self, components) -> int:
        return MAX_SEQUENCE_LENGTH
