"""What a backbone's text side gives its denoiser: hidden states, plus per-row extras.

Stable Diffusion 1.x/2.x conditions on the text encoder's hidden states alone, so its
conditioning is a plain ``(B, L, D)`` tensor. Other backbones need more per prompt:
SD-XL the pooled, projected embedding of its second encoder (``text_embeds``), PixArt-α
the T5 attention mask (``encoder_attention_mask``). :class:`Conditioning` carries those
next to the hidden states and behaves like a tensor where the sampler loop and the
training step need it to: rows are selected with ``cond[index]``, moved with
``cond.to(device, dtype)``, and joined with :func:`cat`. Code that only moves
conditionings around never needs to know which backbone made them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch


@dataclass
class Conditioning:
    hidden_states: torch.Tensor  # (B, L, D)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # each (B, ...)

    def __post_init__(self):
        for name, value in self.extras.items():
            if value.shape[0] != self.hidden_states.shape[0]:
                raise ValueError(f"conditioning extra {name!r} has {value.shape[0]} rows, hidden states {self.hidden_states.shape[0]}")

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def __getitem__(self, index) -> "Conditioning":
        if isinstance(index, int):
            index = slice(index, index + 1)  # keep the batch dimension
        return Conditioning(self.hidden_states[index], {k: v[index] for k, v in self.extras.items()})

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def shape(self) -> torch.Size:
        return self.hidden_states.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden_states.dtype

    @property
    def device(self) -> torch.device:
        return self.hidden_states.device

    def to(self, device=None, dtype=None) -> "Conditioning":
        """Move every tensor; only floating ones change dtype (masks keep theirs)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Conditioning(move(self.hidden_states), {k: move(v) for k, v in self.extras.items()})

    def replace(self, hidden_states: torch.Tensor) -> "Conditioning":
        """The same extras with new hidden states (methods that edit the embedding)."""
        return Conditioning(hidden_states, dict(self.extras))

    def detach(self) -> "Conditioning":
        return Conditioning(self.hidden_states.detach(), {k: v.detach() for k, v in self.extras.items()})


#: What ``encode_prompts`` returns: hidden states, or hidden states with extras.
Cond = Union[torch.Tensor, Conditioning]


def cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch (all tensors, or all :class:`Conditioning`)."""
    if all(isinstance(c, torch.Tensor) for c in conds):
        return torch.cat(list(conds))
    if not all(isinstance(c, Conditioning) for c in conds):
        raise TypeError("cannot concatenate plain hidden states with conditionings that carry extras")
    keys = set(conds[0].extras)
    if any(set(c.extras) != keys for c in conds):
        raise ValueError("conditionings with different extras cannot be concatenated")
    return Conditioning(torch.cat([c.hidden_states for c in conds]),
                        {k: torch.cat([c.extras[k] for c in conds]) for k in conds[0].extras})


def hidden_states(cond: Cond) -> torch.Tensor:
    """The (B, L, D) hidden states of a conditioning of any backbone."""
    return cond.hidden_states if isinstance(cond, Conditioning) else cond


def with_hidden_states(cond: Cond, states: torch.Tensor) -> Cond:
    """``cond`` with its hidden states replaced (extras kept)."""
    return cond.replace(states) if isinstance(cond, Conditioning) else states
