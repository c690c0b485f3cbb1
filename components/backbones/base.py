"""The backbone interface and its registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from components.conditioning import Cond

if TYPE_CHECKING:
    from components.loader import DiffusionComponents

#: backbone name -> class
BACKBONES: dict[str, type["Backbone"]] = {}


def register(cls: type["Backbone"]) -> type["Backbone"]:
    BACKBONES[cls.name] = cls
    return cls


def backbone_for_pipeline(class_name: str) -> type["Backbone"]:
    """The backbone that loads folders of the diffusers pipeline class ``class_name``."""
    for cls in BACKBONES.values():
        if class_name in cls.pipeline_classes:
            return cls
    known = sorted(n for cls in BACKBONES.values() for n in cls.pipeline_classes)
    raise ValueError(
        f"This model is a {class_name} (model_index.json's _class_name); the supported pipelines are {known}. "
        "A new model family needs a backbone file in components/backbones/ (see its README section)."
    )


class Backbone:
    """One model family: its components, text encoding and denoiser call.

    Class attributes:
        name: the backbone's short name (``sd``, ``sdxl``, ``pixart-alpha``).
        pipeline_classes: diffusers pipeline class names whose folders it loads.
        denoiser_name: the denoiser's subfolder in a pipeline folder (``unet``,
            ``transformer``); artifacts that hold a whole denoiser use it too.
        text_encoder_names: the text encoders' subfolders, in conditioning order.
        pipeline_options: ``model_index.json`` entries the backbone reads
            (SD-XL's ``force_zeros_for_empty_prompt``).
        tiny_config: configs of the tiny random-weight preset.
    """

    name: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    denoiser_name: ClassVar[str] = "unet"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    pipeline_options: ClassVar[dict[str, Any]] = {}
    tiny_config: ClassVar[dict] = {}

    def __init__(self, **options):
        unknown = set(options) - set(self.pipeline_options)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown options {sorted(unknown)}")
        self.options = {**self.pipeline_options, **options}

    @classmethod
    def from_model_index(cls, index: dict) -> "Backbone":
        return cls(**{k: index[k] for k in cls.pipeline_options if k in index})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    # ------------------------------------------------------------------ loading and building

    def load(self, source: str, revision: str | None = None, variant: str | None = None,
             torch_dtype: torch.dtype | None = None) -> "DiffusionComponents":
        """Components from a diffusers pipeline folder or hub id of this family."""
        raise NotImplementedError

    def build(self, config: dict, prediction_type: str = "epsilon", seed: int = 0,
              source: str = "") -> "DiffusionComponents":
        """Components with seeded random weights from a config like :attr:`tiny_config`."""
        raise NotImplementedError

    def pipeline(self, components: "DiffusionComponents", scheduler) -> Any:
        """The diffusers pipeline of this family sharing ``components``' modules."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the seam

    def encode(self, components: "DiffusionComponents", prompts: Sequence[str]) -> Cond:
        """The denoiser's conditioning for fully written prompts: ``(B, L, D)`` hidden
        states, or a :class:`~components.conditioning.Conditioning` with extras."""
        raise NotImplementedError

    def encode_text_rows(self, components: "DiffusionComponents", prompts: Sequence[str]) -> Cond:
        """:meth:`encode` as the text encoders give it, without the pipeline's rule for the
        empty prompt (SD-XL zeroes it for classifier-free guidance): the rows a prompt's
        padding holds, which HiFi Tuner starts its learned vectors from. Default: ``encode``."""
        return self.encode(components, prompts)

    def predict(self, components: "DiffusionComponents", latents: torch.Tensor, timesteps: torch.Tensor | int,
                cond: Cond) -> torch.Tensor:
        """The denoiser's (``components.unet``) prediction (ε, v, ... as the scheduler
        config says) for latents (B, C, h, w) at timestep(s) under ``cond``: (B, C, h, w).
        Learned-variance outputs are cut to their first C channels here."""
        raise NotImplementedError

    def pipeline_inputs(self, cond: Cond, negative: Cond) -> dict:
        """Keyword arguments that hand precomputed conditionings to the family's pipeline
        (``prompt_embeds``, ``negative_prompt_embeds`` and the family's extras)."""
        return {"prompt_embeds": cond, "negative_prompt_embeds": negative}

    def max_length(self, components: "DiffusionComponents") -> int:
        """Tokens per prompt (the cross-attention key length)."""
        return components.tokenizer.model_max_length
