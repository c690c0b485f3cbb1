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

Where the concept sits in the conditioning is the model's to say, not the prompt
string's: ``concept_token_positions(template)`` gives the rows of the concept prompt's
conditioning that carry the concept, ``prompt_tokens(prompt)`` the token behind every
row. Attention samplers (masked, Photoswap, reference-guided, subject replacement) read
them, so a method that writes its concept somewhere else (HiFi Tuner drops the
placeholder and puts c_s in the last n rows) is located right.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from components.conditioning import Cond
from components.loader import DiffusionComponents

SLOT = "{}"

#: a conditioning row that holds no text token (a learned vector written over it)
NO_TOKEN = -1


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

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The token id behind each row of the conditioning of a fully written prompt
        (its length is the conditioning's L), :data:`NO_TOKEN` at rows the method fills
        with learned vectors instead of text tokens (HiFi Tuner's c_s). Attention control
        aligns two prompts row by row with it (Photoswap, prompt-to-prompt)."""
        ...

    def concept_token_positions(self, template: str) -> list[int]:
        """Rows of the conditioning of the concept prompt ``fill(template, concept_phrase)``
        that carry the concept (its new tokens, the identifier, HiFi Tuner's c_s rows):
        where attention samplers read and steer the concept's cross-attention."""
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


def text_tokens(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt as the text encoder reads it (padded to the tokenizer's length)."""
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids


def phrase_token_positions(tokenizer, template: str, concept_phrase: str, superclass: str) -> list[int]:
    """Positions of the concept phrase's own tokens in the filled concept prompt.

    The concept phrase ("sks dog", "<cat-toy>") sits right after the template's prefix;
    its tokens that are not superclass tokens ("sks") are the concept tokens. When the
    phrase has none (a phrase equal to the superclass) all its tokens count. This is the
    default of :meth:`PersonalizedModel.concept_token_positions` for methods whose
    concept is written as words in the prompt.
    """
    prefix = " ".join(template.split(SLOT)[0].split())
    n_prefix = len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0
    phrase = tokenizer(concept_phrase, add_special_tokens=False).input_ids
    ids = text_tokens(tokenizer, fill(template, concept_phrase))
    start = n_prefix + _leading_special_tokens(tokenizer)  # after CLIP's <|startoftext|>; T5 has none
    if ids[start : start + len(phrase)] != phrase:
        raise ValueError(
            f"could not locate the concept phrase {concept_phrase!r} in the tokens of template {template!r}; "
            f"is the prompt longer than the tokenizer's {tokenizer.model_max_length} tokens?"
        )
    superclass_ids = set(tokenizer(superclass, add_special_tokens=False).input_ids)
    positions = [start + j for j, tok in enumerate(phrase) if tok not in superclass_ids]
    return positions or list(range(start, start + len(phrase)))


def _leading_special_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer puts before the text (CLIP: 1, T5: 0)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    return next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)


def word_token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens at its first whole-word occurrence in ``prompt``
    (as :func:`text_tokens` numbers them); ValueError if the prompt does not hold it."""
    words = prompt.split()
    target = word.split()
    for i in range(len(words) - len(target) + 1):
        if [w.lower() for w in words[i : i + len(target)]] == [w.lower() for w in target]:
            prefix = " ".join(words[:i])
            n_prefix = len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0
            n_word = len(tokenizer(" ".join(words[i : i + len(target)]), add_special_tokens=False).input_ids)
            start = n_prefix + _leading_special_tokens(tokenizer)
            if start + n_word > tokenizer.model_max_length:
                break
            return list(range(start, start + n_word))
    raise ValueError(f"{word!r} is not a word of the prompt {prompt!r}")


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

    def prompt_tokens(self, prompt: str) -> list[int]:
        return text_tokens(self.components.tokenizer, prompt)

    def concept_token_positions(self, template: str) -> list[int]:
        return phrase_token_positions(self.components.tokenizer, template, self.concept_phrase, self.superclass)
