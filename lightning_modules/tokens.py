"""New tokens for a frozen text encoder: the vocabulary grows, the old rows never change.

:class:`ExtendedEmbedding` wraps the text encoder's token embedding: ids of the original
vocabulary read the frozen table, ids of added tokens read a small trainable matrix.
Only the new rows are parameters that train, so every original row stays bit-identical
(no gradient masking, no weight decay leaking into frozen rows) and checkpoints hold only
the new vectors.
"""

from __future__ import annotations

import re

import torch
from torch import nn


class ExtendedEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.num_base = base.num_embeddings
        self.new = nn.Parameter(init.detach().clone().float())  # (n_new, D), kept in fp32

    @property
    def weight(self) -> torch.Tensor:
        """The full (vocab, D) table, as an ``nn.Embedding`` exposes it."""
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)])

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.new.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.num_base  # (B, L)
        out = self.base(input_ids.clamp(max=self.num_base - 1))  # (B, L, D)
        if is_new.any():
            new = self.new[(input_ids - self.num_base).clamp(min=0)].to(out.dtype)
            out = torch.where(is_new[..., None], new, out)
        return out


def token_names(placeholder: str, num_vectors: int) -> list[str]:
    """``<p>``, ``<p>_1``, ... — the multi-vector naming diffusers' loader expects."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def add_tokens(tokenizer, text_encoder, placeholder: str, num_vectors: int = 1,
               initializer: str | None = None) -> ExtendedEmbedding:
    """Add ``num_vectors`` tokens for ``placeholder`` and wrap the token embedding.

    The new vectors start from the embedding of ``initializer`` (its first token), or
    from the mean embedding of the vocabulary when no initializer word is given.
    """
    names = token_names(placeholder, num_vectors)
    vocab = tokenizer.get_vocab()
    # a clash: the exact string is a token, or the word already tokenizes to one token
    clash = [t for t in names if t in vocab or len(tokenizer(t, add_special_tokens=False).input_ids) == 1]
    if clash:
        raise ValueError(
            f"Placeholder {clash[0]!r} is already a token of the tokenizer: a new token must be a new string. "
            "Choose another placeholder, e.g. '<my-concept>'."
        )
    embeddings = text_encoder.get_input_embeddings()
    if isinstance(embeddings, ExtendedEmbedding):
        raise ValueError("This text encoder already has added tokens; add all tokens in one call.")
    if initializer:
        ids = tokenizer(initializer, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"Initializer word {initializer!r} tokenizes to nothing; choose a word such as the superclass.")
        init_vec = embeddings.weight[ids[0]]
    else:
        init_vec = embeddings.weight.mean(0)
    if tokenizer.add_tokens(names) != num_vectors:
        raise ValueError(f"Could not add tokens {names} to the tokenizer.")
    ext = ExtendedEmbedding(embeddings, init_vec.expand(num_vectors, -1))
    text_encoder.set_input_embeddings(ext)
    text_encoder.config.vocab_size = ext.num_embeddings
    return ext


def expand_placeholder(prompt: str, placeholder: str, num_vectors: int) -> str:
    """Write a multi-vector placeholder as its tokens: ``<p>`` -> ``<p> <p>_1 <p>_2``."""
    if num_vectors <= 1:
        return prompt
    full = " ".join(token_names(placeholder, num_vectors))
    prompt = prompt.replace(full, placeholder)  # idempotent: collapse, then expand every occurrence
    pattern = re.escape(placeholder) + r"(?!_\d)"
    return re.sub(pattern, full, prompt)


#: diffusers' keys for a textual-inversion file of a model with two text encoders (SD-XL)
ENCODER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def add_concept_tokens(module, placeholder: str, num_vectors: int = 1, initializer: str | None = None) -> None:
    """:func:`add_tokens` in every text encoder of ``module`` (SD-XL: one set of vectors
    per encoder, each initialised from that encoder's own embedding of ``initializer``)."""
    for name, encoder in module.text_encoders().items():
        add_tokens(getattr(module, name.replace("text_encoder", "tokenizer")), encoder, placeholder, num_vectors, initializer)


def concept_token_state(module, placeholder: str) -> dict[str, torch.Tensor]:
    """The learned vectors in diffusers' textual-inversion format: ``{placeholder: (n, D)}``
    for one text encoder; ``{"clip_l": (n, D_1), "clip_g": (n, D_2)}`` for two (SD-XL),
    which ``pipe.load_textual_inversion(state["clip_g"], token=..., text_encoder=pipe.text_encoder_2,
    tokenizer=pipe.tokenizer_2)`` (and ``clip_l`` with the first encoder) reads."""
    encoders = module.text_encoders()
    new = {name: enc.get_input_embeddings().new.detach().float().cpu().contiguous() for name, enc in encoders.items()}
    return {placeholder: new["text_encoder"]} if len(new) == 1 else {ENCODER_KEYS[n]: v for n, v in new.items()}


def load_concept_token_state(module, placeholder: str, state: dict[str, torch.Tensor], path) -> None:
    """Copy vectors written by :func:`concept_token_state` into ``module``'s new tokens."""
    encoders = module.text_encoders()
    keys = {"text_encoder": placeholder} if len(encoders) == 1 else ENCODER_KEYS
    for name, encoder in encoders.items():
        if keys[name] not in state:
            raise KeyError(f"{path} holds {sorted(state)}, not {keys[name]!r} (the vectors of {name}).")
        target = encoder.get_input_embeddings().new
        with torch.no_grad():
            target.copy_(state[keys[name]].reshape(target.shape))


def added_token_positions(module, prompt: str) -> list[int]:
    """Positions of the tokens added by :func:`add_tokens` in ``prompt`` as the module's
    (first) text encoder reads it."""
    ids = module.prompt_tokens(prompt)
    embeddings = module.text_encoder.get_input_embeddings()
    first_new = embeddings.num_base if isinstance(embeddings, ExtendedEmbedding) else None
    return [] if first_new is None else [i for i, t in enumerate(ids) if t >= first_new]
