"""Prompt-to-prompt attention control (Hertz et al.) for HiFi Tuner's subject replacement.

Two controls over the attention-processor machinery of ``components.attention``:

* :class:`CrossAttentionStore` records, per DDIM step and per cross-attention layer call
  (in call order), the source prompt's cross-attention probabilities softmax(QKᵀ/√d) of
  one branch. Memory-light: only the token columns that will be replayed are kept (in
  ``dtype``, fp16 by default), and only while :meth:`start` … :meth:`stop` is active.
* :class:`CrossAttentionReplay` replays them in the edit pass: every row of the edit
  prompt aligned to a source token takes the stored map of that token; the *free* rows
  (HiFi Tuner's F̃ with [c_s^t, w_g] free: the concept's rows and the new subject word)
  keep the edit pass's own maps. The replayed maps multiply the edit pass's own values.

Rows of a UNet call are branch-major (``samplers.base.Run.predict``), so ``branch`` /
``n_branches`` say which rows are the conditional ones (unconditional rows run untouched,
as in prompt-to-prompt's code).
"""

from __future__ import annotations

from typing import Sequence

import torch

from components.attention import AttentionControl, align_prompts


class CrossAttentionStore(AttentionControl):
    """Cross-attention maps of one branch, per step and layer call, only ``columns``."""

    def __init__(self, columns: Sequence[int], n_branches: int = 1, branch: int = 0, dtype=torch.float16):
        super().__init__(n_branches)
        self.columns = torch.as_tensor(list(columns), dtype=torch.long)
        self.branch, self.dtype = branch, dtype
        self.maps: dict[int, list[torch.Tensor]] = {}  # step -> per call (b, H, P, len(columns))
        self.step: int | None = None

    def start(self, step: int) -> None:
        self.step = step
        self.maps[step] = []

    def stop(self) -> None:
        self.step = None

    def wants(self, is_cross: bool) -> bool:
        return is_cross and self.step is not None

    def edit_attention(self, q, k, v, out, is_cross: bool, scale: float) -> None:
        rows = self.rows(q.shape[0], self.branch)
        probs = self.probs(q, k, rows, scale)  # (b, H, P, S)
        self.maps[self.step].append(probs[..., self.columns.to(probs.device)].to(self.dtype))

    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for maps in self.maps.values() for m in maps)


class CrossAttentionReplay(AttentionControl):
    """The edit pass: stored source maps for aligned rows, own maps for the free rows.

    ``targets``: rows of the edit prompt that replay; ``slots``: for each, the index
    into the store's ``columns`` of its source token. ``steps``: the steps to replay
    (default: every step the store holds).
    """

    def __init__(self, store: CrossAttentionStore, targets: Sequence[int], slots: Sequence[int],
                 n_branches: int = 2, branch: int = 1, steps: set[int] | None = None):
        super().__init__(n_branches)
        self.store, self.branch = store, branch
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.slots = torch.as_tensor(list(slots), dtype=torch.long)
        self.steps = set(store.maps) if steps is None else set(steps)
        self.step: int | None = None
        self.call = 0

    def set_step(self, i: int) -> None:
        self.step, self.call = i, 0

    def wants(self, is_cross: bool) -> bool:
        return is_cross and self.step in self.steps

    def edit_attention(self, q, k, v, out, is_cross: bool, scale: float) -> None:
        maps = self.store.maps[self.step]
        if self.call >= len(maps):
            raise RuntimeError("the edit pass has more cross-attention calls per step than the recorded source pass")
        stored = maps[self.call]  # (b, H, P, C)
        self.call += 1
        rows = self.rows(q.shape[0], self.branch)
        probs = self.probs(q, k, rows, scale)  # (b, H, P, S) the edit pass's own maps
        if stored.shape[:3] != probs.shape[:3]:
            raise RuntimeError(f"stored maps {tuple(stored.shape)} do not fit this call {tuple(probs.shape)}")
        dev = probs.device
        probs[..., self.targets.to(dev)] = stored[..., self.slots.to(dev)].to(probs.dtype)
        out[rows] = (probs.to(v.dtype) @ v[rows]).to(out.dtype)


def replacement_plan(model, source_prompt: str, edit_prompt: str, free: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """(source columns to store, edit rows that replay, their slot in the stored columns).

    Rows of the edit prompt aligned (token by token, through the model's
    ``prompt_tokens``) to a source row replay that row's map unless they are ``free``;
    unaligned rows (new tokens, HiFi Tuner's c_s rows) keep their own.
    """
    index, alpha = align_prompts(model, source_prompt, edit_prompt)
    free = set(int(f) for f in free)
    targets = [j for j in range(len(index)) if alpha[j] > 0 and j not in free]
    columns = sorted({int(index[j]) for j in targets})
    slot = {c: s for s, c in enumerate(columns)}
    return columns, targets, [slot[int(index[j])] for j in targets]
