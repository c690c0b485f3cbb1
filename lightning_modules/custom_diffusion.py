"""Custom Diffusion (Kumari et al., 2023): fine-tune only the cross-attention key and
value projections of the UNet (the layers that read the text), plus a new modifier
token ``V*`` written before the superclass word ("a photo of <new1> dog").

The k/v weights train in place (``attn2.to_k``/``attn2.to_v``), which computes exactly
what diffusers' ``CustomDiffusionAttnProcessor`` computes with its k/v initialised from
the original weights, but keeps the UNet's default attention processors: samplers that
install their own processors (masked sampling, Photoswap) see the trained weights.
As in the official code, the key and value of the start token get no gradient.

Artifact (the files diffusers' Custom Diffusion example writes and reads):

- ``pytorch_custom_diffusion_weights.safetensors``: ``<layer>.processor.to_k_custom_diffusion.weight``
  etc., read by ``pipe.unet.load_attn_procs(folder, weight_name=..., _pipeline=pipe)``.
  Attention layers that did not train get an empty entry, as the ``.bin`` format has, so
  the loader builds a processor for every layer. (diffusers 0.42 installs the loaded
  processors only when ``_pipeline`` is passed: huggingface/diffusers#9320.)
- ``learned_embeds.safetensors``: ``{modifier token: (1, D)}``, read by
  ``pipe.load_textual_inversion(folder)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from components.personalized import fill
from lightning_modules.base import PersonalizationModule
from lightning_modules.textual_inversion import EMBEDS_FILE
from lightning_modules.tokens import add_concept_tokens, added_token_positions, concept_token_state, load_concept_token_state

WEIGHTS_FILE = "pytorch_custom_diffusion_weights.safetensors"

#: our projection name -> diffusers' processor weight name
_PROCESSOR_NAMES = {
    "to_k.weight": "to_k_custom_diffusion.weight",
    "to_v.weight": "to_v_custom_diffusion.weight",
    "to_q.weight": "to_q_custom_diffusion.weight",
    "to_out.0.weight": "to_out_custom_diffusion.0.weight",
    "to_out.0.bias": "to_out_custom_diffusion.0.bias",
}


def _detach_start_token(module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the start token's key/value, (B, 1, C), is a constant for the gradient."""
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


class CustomDiffusion(PersonalizationModule):
    """Custom Diffusion.

    Args:
        train_q_out: also train the query and output projections of cross-attention
            (diffusers' ``--freeze_model crossattn``; default: k/v only, ``crossattn_kv``).
        modifier_token: learn the placeholder as a new token ``V*`` (else the placeholder
            is an existing word and only the weights train).
        initializer_token: word whose embedding initialises the modifier token (the
            paper uses a rare word; diffusers' example ``ktn``).
        detach_start_token: no gradient through the start token's key and value, as
            the official implementation and diffusers' processor do.
        **kwargs: see :class:`~lightning_modules.base.PersonalizationModule`.
    """

    default_learning_rate = 1e-5  # Custom Diffusion, SD (sampling study, appendix B)
    unsupported_backbones = {
        "pixart-alpha": "its modifier token needs new T5 tokens, and T5's embedding table is padded past its "
                        "vocabulary; use DreamBooth or LoRA on PixArt-α.",
    }

    def __init__(self, *args, train_q_out: bool = False, modifier_token: bool = True,
                 initializer_token: str | None = "ktn", detach_start_token: bool = True, **kwargs):
        super().__init__(*args, **kwargs)

    def cross_attention_layers(self) -> dict[str, torch.nn.Module]:
        """``{name: Attention}`` of the UNet's cross-attention layers (``attn2``)."""
        names = [n.removesuffix(".processor") for n in self.unet.attn_processors]
        layers = {n: self.unet.get_submodule(n) for n in names}
        return {n: m for n, m in layers.items() if m.is_cross_attention}

    def trained_projections(self) -> tuple[str, ...]:
        return ("to_k", "to_v", "to_q", "to_out.0") if self.hparams.train_q_out else ("to_k", "to_v")

    def configure_trainable(self) -> None:
        layers = self.cross_attention_layers()
        if not layers:
            raise ValueError("Custom Diffusion needs a UNet with cross-attention layers; this one has none.")
        for attn in layers.values():
            for proj in self.trained_projections():
                attn.get_submodule(proj).requires_grad_(True)
            if self.hparams.detach_start_token:
                attn.to_k.register_forward_hook(_detach_start_token)
                attn.to_v.register_forward_hook(_detach_start_token)
        if self.hparams.modifier_token:
            add_concept_tokens(self, self.placeholder, 1, self.hparams.initializer_token)

    def concept_token_positions(self, template: str) -> list[int]:
        """The modifier token V* (by token id); without one, the placeholder word's tokens."""
        positions = added_token_positions(self, fill(template, self.concept_phrase)) if self.hparams.modifier_token else []
        return positions or super().concept_token_positions(template)

    # ------------------------------------------------------------------ artifact

    def processor_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights under diffusers' processor names; empty entries for the
        attention layers that did not train."""
        state = {}
        cross = self.cross_attention_layers()
        for proc_name in self.unet.attn_processors:
            layer = proc_name.removesuffix(".processor")
            if layer not in cross:
                state[proc_name] = torch.empty(0)
                continue
            for ours, theirs in _PROCESSOR_NAMES.items():
                if ours.rsplit(".", 1)[0] in self.trained_projections():
                    t = cross[layer].get_parameter(ours)
                    state[f"{proc_name}.{theirs}"] = t.detach().float().cpu().contiguous()
        return state

    def save_artifact_files(self, folder: Path) -> None:
        save_file(self.processor_state_dict(), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        if self.hparams.modifier_token:
            save_file(concept_token_state(self, self.placeholder), str(folder / EMBEDS_FILE))

    def load_artifact_files(self, folder: Path) -> None:
        to_ours = {theirs: ours for ours, theirs in _PROCESSOR_NAMES.items()}
        cross = self.cross_attention_layers()
        for key, value in load_file(str(folder / WEIGHTS_FILE)).items():
            if value.numel() == 0:
                continue  # a layer that did not train
            proc_name, _, weight_name = key.partition(".processor.")
            if proc_name not in cross or weight_name not in to_ours:
                raise KeyError(f"{folder / WEIGHTS_FILE}: unexpected entry {key!r} for this UNet.")
            param = cross[proc_name].get_parameter(to_ours[weight_name])
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
        if self.hparams.modifier_token:
            load_concept_token_state(self, self.placeholder, load_file(str(folder / EMBEDS_FILE)), folder / EMBEDS_FILE)
