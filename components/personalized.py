"""The one interface through which samplers, callbacks and evaluation reach a model.

A *personalized model* is the base components plus "encode these prompts, at this
timestep" (the result is the backbone's conditioning, components.conditioning). Prompts are templates with one ``{}`` slot for the subject:
``"a {} on the beach"``. The model fills the slot with its concept phrase (``"sks dog"``
for DreamBooth, ``"<cat-toy> toy"`` for Textual Inversion) or with the superclass word
(``"dog"``), so samplers build both prompts without knowing the method.

Every fine-tuning LightningModule implements this interface, and so does
:class:`BaseModel` (the plain model, no personalization), so every sampler works with
every method and with methods added later. ``timestep_dependent`` is True for methods
whose embedding changes per denoising step (HiFi Tuner's step-wise embeddings):
samplers then call ``encode_prompts`` at every step instead of once.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from components.conditioning import Cond
from components.loader import DiffusionComponents

SLOT = "{}"


@runtime_checkable
class PersonalizedModel(Protocol):
    components: DiffusionComponents
    superclass: str
    timestep_dependent: bool

    @property
    def concept_phrase(self) -> str: ...

    def encode_prompts(self, prompts: Sequence[str], timestep: int | None = None) -> Cond:
        """The denoiser's conditioning for fully written prompts: (B, L, D) hidden states,
        or a :class:`~components.conditioning.Conditioning` (hidden states + the
        backbone's extras, e.g. SD-XL's pooled embedding)."""
        ...


def fill(template: str, phrase: str) -> str:
    """Write ``phrase`` into the template's ``{}`` slot, collapsing doubled spaces."""
    if SLOT not in template:
        raise ValueError(f"Prompt template {template!r} has no '{{}}' slot for the subject, e.g. 'a {{}} on the beach'.")
    return " ".join(template.replace(SLOT, phrase).split())


def concept_prompt(model: PersonalizedModel, template: str) -> str:
    return fill(template, model.concept_phrase)


def superclass_prompt(model: PersonalizedModel, template: str) -> str:
    return fill(template, model.superclass)


@torch.no_grad()
def tokenize(tokenizer, prompts: Sequence[str], device=None) -> torch.Tensor:
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device) if device is not None else ids


def encode_text(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP text encoder last hidden states, (B, L, D), as Stable Diffusion conditions on."""
    device = next(text_encoder.parameters()).device
    return text_encoder(tokenize(tokenizer, prompts, device))[0]


class BaseModel:
    """The plain base model behind the personalized-model interface.

    Its concept phrase defaults to ``"<placeholder> <superclass>"`` so that evaluating
    the base model with a concept prompt shows what a model that learned nothing draws.
    """

    timestep_dependent = False

    def __init__(self, components: DiffusionComponents, superclass: str = "", placeholder: str = "sks"):
        self.components = components
        self.superclass = superclass
        self.placeholder = placeholder

    @property
    def concept_phrase(self) -> str:
        return f"{self.placeholder} {self.superclass}".strip()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], timestep: int | None = None) -> Cond:
        return self.components.encode(prompts)
