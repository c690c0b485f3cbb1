"""Textual Inversion (Gal et al., 2023): learn the embedding of one new token (or a few
vectors of it) while the whole model stays frozen. On SD-XL the token is learned in both
text encoders (one set of vectors each).

Artifact: ``learned_embeds.safetensors`` in the format of diffusers' ``load_textual_inversion``:
one key, the placeholder, holding a (num_vectors, D) tensor; on SD-XL the keys ``clip_l``
and ``clip_g``, one per encoder (load each with ``text_encoder=``/``tokenizer=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from components.personalized import fill
from lightning_modules.base import PersonalizationModule
from lightning_modules.tokens import (
    add_concept_tokens,
    added_token_positions,
    concept_token_state,
    expand_placeholder,
    load_concept_token_state,
)

EMBEDS_FILE = "learned_embeds.safetensors"


class TextualInversion(PersonalizationModule):
    """Textual Inversion.

    Args:
        num_vectors: vectors of the new token (diffusers' multi-vector convention:
            ``<p>``, ``<p>_1``, ...).
        initializer_token: word whose embedding initialises the vectors (default: the
            superclass word).
        include_superclass: write the concept as ``"<p> dog"`` (True) or ``"<p>"`` alone.
        **kwargs: see :class:`~lightning_modules.base.PersonalizationModule`.
    """

    default_learning_rate = 5e-3  # Textual Inversion, SD (diffusers example: 5e-4 x batch scaling)
    unsupported_backbones = {
        "pixart-alpha": "T5's embedding table is padded past its vocabulary, so new tokens cannot be told from the "
                        "padding rows; use DreamBooth or LoRA on PixArt-α.",
    }

    def __init__(self, *args, num_vectors: int = 1, initializer_token: str | None = None,
                 include_superclass: bool = False, **kwargs):
        if num_vectors < 1:
            raise ValueError(f"num_vectors={num_vectors}: a token needs at least one vector.")
        super().__init__(*args, **kwargs)

    def configure_trainable(self) -> None:
        init = self.hparams.initializer_token or (self.superclass.split()[0] if self.superclass else None)
        add_concept_tokens(self, self.placeholder, self.hparams.num_vectors, init)

    @property
    def token_embedding(self):
        """The text encoder's :class:`~lightning_modules.tokens.ExtendedEmbedding`."""
        return self.text_encoder.get_input_embeddings()

    @property
    def concept_phrase(self) -> str:
        # written as the text encoder sees it (``<p> <p>_1 ...``), so samplers that locate
        # the concept's tokens (masked, Photoswap) find every vector
        phrase = expand_placeholder(self.placeholder, self.placeholder, self.hparams.num_vectors)
        return f"{phrase} {self.superclass}".strip() if self.hparams.include_superclass else phrase

    def encode_prompts(self, prompts: Sequence[str], timestep: int | None = None) -> torch.Tensor:
        prompts = [expand_placeholder(p, self.placeholder, self.hparams.num_vectors) for p in prompts]
        return self.components.encode(prompts)

    def prompt_tokens(self, prompt: str) -> list[int]:
        return super().prompt_tokens(expand_placeholder(prompt, self.placeholder, self.hparams.num_vectors))

    def concept_token_positions(self, template: str) -> list[int]:
        """Every vector of the new token (``<p> <p>_1 ...``), found by token id."""
        positions = added_token_positions(self, fill(template, self.concept_phrase))
        return positions or super().concept_token_positions(template)

    def save_artifact_files(self, folder: Path) -> None:
        save_file(concept_token_state(self, self.placeholder), str(folder / EMBEDS_FILE))

    def load_artifact_files(self, folder: Path) -> None:
        load_concept_token_state(self, self.placeholder, load_file(str(folder / EMBEDS_FILE)), folder / EMBEDS_FILE)
