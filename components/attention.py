"""Attention capture and injection through diffusers attention processors.

:func:`attention_control` wraps every processor of the UNet (keyed by the names in
``unet.attn_processors``) in a :class:`ControlledProcessor` and restores the originals on
exit, even after an error. A wrapped layer runs its original processor untouched unless
the :class:`AttentionControl` asks for it at that call; then it computes the attention
itself (same projections, scaled dot-product attention) and lets the control observe or
edit it. Two controls:

* :class:`ConceptMapStore` (masked sampling): the concept token's cross-attention map of
  the concept branch, softmax(QKᵀ/√d) averaged over heads, upsampled to the latent size
  and averaged over all cross-attention layers. Only that (B, 1, h, w) average is kept,
  never a full attention map.
* :class:`AttentionInjection` (Photoswap): a source branch's self-attention output
  ("features"), cross-attention maps and self-attention maps replace a target branch's.

Rows of a UNet call are branch-major (``samplers.base.Run.predict``): branch k holds
rows k·B ... (k+1)·B − 1; tensors inside are (N, heads, tokens, head_dim), N = branches·B.
"""

from __future__ import annotations

import difflib
import math
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from components.personalized import NO_TOKEN, fill, text_tokens
from components.personalized import phrase_token_positions


class AttentionControl:
    """Decides which attention calls to take over and what to do with them."""

    def __init__(self, n_branches: int):
        self.n_branches = n_branches
        #: the current call's additive attention bias, (N, heads, 1 or P, S), or None: PixArt-α's
        #: cross-attention masks the T5 padding tokens (set by ControlledProcessor per call)
        self.bias: torch.Tensor | None = None

    def probs(self, q: torch.Tensor, k: torch.Tensor, rows: slice, scale: float) -> torch.Tensor:
        """softmax(QKᵀ·scale + bias) of some rows, float32, (b, H, P, S)."""
        return attention_probs(q[rows], k[rows], scale, None if self.bias is None else self.bias[rows])

    def rows(self, n: int, branch: int) -> slice:
        if n % self.n_branches:
            raise RuntimeError(f"a UNet call of {n} rows cannot hold {self.n_branches} branches of equal size")
        b = n // self.n_branches
        return slice(branch * b, (branch + 1) * b)

    def wants(self, is_cross: bool) -> bool:
        """Take over this call? False runs the layer's original processor."""
        return False

    def edit_attention(self, q, k, v, out, is_cross: bool, scale: float) -> None:
        """Observe or edit ``out`` = attention(q, k, v), (N, heads, P, d), in place."""

    def edit_output(self, out: torch.Tensor, is_cross: bool) -> None:
        """Observe or edit the layer output after the output projection, (N, P, C), in place."""


class ControlledProcessor:
    """Runs ``original`` unless ``control`` wants the call; then attends itself."""

    def __init__(self, original, control: AttentionControl):
        self.original, self.control = original, control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        is_cross = encoder_hidden_states is not None
        if not self.control.wants(is_cross):
            return self.original(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask, temb=temb, **kwargs,
            )
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError(
                "attention control supports transformer attention layers (3-D hidden states, no group or "
                "spatial norm), as in Stable Diffusion UNets; this layer is not one"
            )
        residual = hidden_states
        context = hidden_states
        if is_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        bias = None
        if attention_mask is not None:  # as AttnProcessor2_0 prepares it: (N, H, 1 or P, S)
            n = hidden_states.shape[0]
            bias = attn.prepare_attention_mask(attention_mask, context.shape[1], n)
            bias = bias.view(n, attn.heads, -1, bias.shape[-1])
        self.control.bias = bias
        q = _heads(attn.to_q(hidden_states), attn.heads)  # (N, H, P, d), P = pixels of this layer
        k = _heads(attn.to_k(context), attn.heads)  # (N, H, S, d), S = tokens (cross) or P (self)
        v = _heads(attn.to_v(context), attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # (N, H, P, d)
        self.control.edit_attention(q, k, v, out, is_cross, attn.scale)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)  # (N, P, H·d)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        self.control.edit_output(out, is_cross)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


#: The run of the sweep planner's worker thread (evaluation.planner): there the UNet is
#: shared by many runs, so a control belongs to that run's rows, not to the whole UNet.
planned = threading.local()


@contextmanager
def attention_control(unet, control: AttentionControl) -> Iterator[AttentionControl]:
    """Install ``control`` on every attention layer of ``unet``; restore on exit.

    Inside a run of the sweep planner, the control is attached to that run instead and
    applies to its rows only (:class:`SegmentedProcessor`).
    """
    run = getattr(planned, "run", None)
    if run is not None and run.unet is unet:
        previous, run.control = run.control, control
        try:
            yield control
        finally:
            run.control = previous
        return
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: ControlledProcessor(proc, control) for name, proc in original.items()})
    try:
        yield control
    finally:
        unet.set_attn_processor(dict(original))


class SegmentedProcessor:
    """One attention layer of a packed UNet call whose rows belong to several runs.

    ``plan.segments`` lists (start, stop, control or None) row ranges that cover the
    call; each range is attended on its own, with its run's control (the layout a
    control sees, branch-major rows, is that of its own run's call). Empty: the original
    processor on all rows.
    """

    def __init__(self, original, plan):
        self.original, self.plan = original, plan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        segments = self.plan.segments
        if not segments:
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, temb=temb, **kwargs)
        outs = []
        for start, stop, control in segments:
            proc = self.original if control is None else ControlledProcessor(self.original, control)
            part = lambda x: None if x is None else x[start:stop]  # noqa: E731
            outs.append(proc(attn, hidden_states[start:stop], encoder_hidden_states=part(encoder_hidden_states),
                             attention_mask=part(attention_mask), temb=part(temb), **kwargs))
        return torch.cat(outs)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(QKᵀ·scale + bias) in float32, (B, H, P, S)."""
    scores = q.float() @ k.float().transpose(-1, -2) * scale
    return (scores if bias is None else scores + bias.float()).softmax(-1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, T, H·d) -> (N, H, T, d)."""
    n, t, _ = x.shape
    return x.view(n, t, heads, -1).transpose(1, 2)


# --------------------------------------------------------------------------- masked sampling


class ConceptMapStore(AttentionControl):
    """Running mean over cross-attention layers of the concept token's map.

    ``token_weights`` (B, S) weighs each cell's concept token positions (summing to 1);
    ``branch`` is the concept branch among ``n_branches``. Set ``active`` for the UNet
    calls to observe; :meth:`pop_mean` returns the (B, 1, h, w) mean and resets.
    """

    def __init__(self, token_weights: torch.Tensor, latent_size: tuple[int, int], branch: int, n_branches: int):
        super().__init__(n_branches)
        self.token_weights, self.latent_size, self.branch = token_weights.float(), tuple(latent_size), branch
        self.active = False
        self.total: torch.Tensor | None = None
        self.layers = 0

    def wants(self, is_cross: bool) -> bool:
        return self.active and is_cross

    def edit_attention(self, q, k, v, out, is_cross: bool, scale: float) -> None:
        rows = self.rows(q.shape[0], self.branch)
        probs = self.probs(q, k, rows, scale)  # (B, H, P, S)
        weights = self.token_weights.to(probs.device)[:, None, None, :]  # (B, 1, 1, S)
        pixel_map = (probs * weights).sum(-1).mean(1)  # (B, P): concept tokens, mean over heads
        h, w = _layer_size(pixel_map.shape[1], self.latent_size)
        pixel_map = pixel_map.view(-1, 1, h, w)
        if (h, w) != self.latent_size:
            pixel_map = F.interpolate(pixel_map, size=self.latent_size, mode="bilinear", align_corners=False)
        self.total = pixel_map if self.total is None else self.total + pixel_map  # (B, 1, h_lat, w_lat)
        self.layers += 1

    def pop_mean(self) -> torch.Tensor:
        """(B, 1, h, w): the map averaged over the cross-attention layers seen since the last pop."""
        if self.total is None:
            raise RuntimeError("no cross-attention map was captured: does the UNet have cross-attention layers?")
        mean, self.total, self.layers = self.total / self.layers, None, 0
        return mean


def _layer_size(pixels: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with ``pixels`` positions, downsampled from the latent by 2^k."""
    factor = round(math.sqrt(latent_size[0] * latent_size[1] / pixels))
    h, w = -(-latent_size[0] // factor), -(-latent_size[1] // factor)
    if h * w != pixels:
        raise ValueError(f"cannot place {pixels} attention positions on the {latent_size} latent grid")
    return h, w


# --------------------------------------------------------------------------- Photoswap


class AttentionInjection(AttentionControl):
    """Photoswap's attention swap from a ``source`` branch into a ``target`` branch.

    Flags, set per step:
    * ``features``: the target's self-attention *output* (after the output projection,
      what the layer adds to the residual stream) becomes the source's; with
      ``uncond=(source, target)`` the unconditional rows' too (Photoswap's code);
    * ``cross_maps``: the target's cross-attention maps become the source's, token by
      token through ``token_index``/``token_alpha`` (B, S): position j of the target
      prompt takes the source map at ``token_index[j]`` where ``token_alpha[j]`` = 1 and
      keeps its own where 0 (the concept prompt has extra tokens);
    * ``self_maps``: the target attends with the source's self-attention maps over its
      own values, in the layers with at most ``self_map_max_positions`` positions (None:
      every layer; Photoswap's code: 32² = 1024).

    ``store`` (optional): a callable given (probs, rows) of every cross-attention call's
    maps of both conditional branches, before any edit (Photoswap's LocalBlend).
    """

    def __init__(self, n_branches: int, source: int, target: int, token_index: torch.Tensor, token_alpha: torch.Tensor,
                 uncond: tuple[int, int] | None = None, self_map_max_positions: int | None = None, store=None):
        super().__init__(n_branches)
        self.source, self.target, self.uncond = source, target, uncond
        self.token_index, self.token_alpha = token_index.long(), token_alpha.float()
        self.self_map_max_positions, self.store = self_map_max_positions, store
        self.features = self.cross_maps = self.self_maps = False

    def set_step(self, features: bool, cross_maps: bool, self_maps: bool) -> None:
        self.features, self.cross_maps, self.self_maps = features, cross_maps, self_maps

    def wants(self, is_cross: bool) -> bool:
        if is_cross:
            return self.cross_maps or self.store is not None
        return self.features or self.self_maps

    def edit_attention(self, q, k, v, out, is_cross: bool, scale: float) -> None:
        src, tgt = self.rows(q.shape[0], self.source), self.rows(q.shape[0], self.target)
        if is_cross and self.store is not None:
            self.store(self.probs(q, k, src, scale), self.probs(q, k, tgt, scale))
        if is_cross and not self.cross_maps:
            return
        if not is_cross:
            if self.features or not self.self_maps:
                return  # the whole self-attention output is replaced below (or nothing is)
            if self.self_map_max_positions is not None and q.shape[2] > self.self_map_max_positions:
                return  # a layer too large for self-map replacement: its own maps
        probs = self.probs(q, k, src, scale)  # (B, H, P, S) source maps
        if is_cross:
            index = self.token_index.to(probs.device)[:, None, None, :].expand_as(probs)
            alpha = self.token_alpha.to(probs.device)[:, None, None, :]  # (B, 1, 1, S)
            own = self.probs(q, k, tgt, scale)
            probs = alpha * probs.gather(-1, index) + (1 - alpha) * own
        out[tgt] = (probs.to(v.dtype) @ v[tgt]).to(out.dtype)  # target values, source maps

    def edit_output(self, out: torch.Tensor, is_cross: bool) -> None:
        if not is_cross and self.features:
            pairs = [(self.source, self.target)] + ([self.uncond] if self.uncond is not None else [])
            for source, target in pairs:
                out[self.rows(out.shape[0], target)] = out[self.rows(out.shape[0], source)]


# --------------------------------------------------------------------------- tokens


def token_ids(tokenizer, prompt: str) -> list[int]:
    return text_tokens(tokenizer, prompt)


def align_token_ids(source: Sequence[int], target: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Map each row of ``target`` to the row holding the same token in ``source``.

    Returns (index, alpha), each (S,): for positions inside a block of tokens shared by
    both (difflib's matching blocks), index is the source position and alpha 1;
    elsewhere (the concept identifier the superclass prompt lacks, rows of learned
    vectors, :data:`~components.personalized.NO_TOKEN`) alpha is 0.
    """
    src = [("src", i) if t == NO_TOKEN else t for i, t in enumerate(source)]  # learned rows match nothing
    tgt = [("tgt", i) if t == NO_TOKEN else t for i, t in enumerate(target)]
    index, alpha = torch.arange(len(tgt)), torch.zeros(len(tgt))
    for block in difflib.SequenceMatcher(None, src, tgt, autojunk=False).get_matching_blocks():
        index[block.b : block.b + block.size] = torch.arange(block.a, block.a + block.size)
        alpha[block.b : block.b + block.size] = 1.0
    return index, alpha


def align_tokens(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`align_token_ids` of two prompts written as text tokens (difflib's matching
    blocks: e.g. the concept identifier the superclass prompt lacks gets alpha 0)."""
    return align_token_ids(token_ids(tokenizer, source), token_ids(tokenizer, target))


def align_prompts(model, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`align_token_ids` of two prompts as ``model`` conditions on them
    (:meth:`~components.personalized.PersonalizedModel.prompt_tokens`: HiFi Tuner's
    text without the placeholder, its c_s rows matching nothing)."""
    return align_token_ids(model.prompt_tokens(source), model.prompt_tokens(target))


def learned_rows(model, prompt: str) -> list[int]:
    """Rows of a prompt's conditioning that hold learned vectors, not text tokens."""
    return [j for j, t in enumerate(model.prompt_tokens(prompt)) if t == NO_TOKEN]


def align_tokens_photoswap(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Photoswap's token map: a global alignment of the two prompts' tokens (without
    padding; match +1, mismatch −1, gaps free, ties resolved as Photoswap's traceback does:
    a target token left unmatched first, then a source token, then the pair); each padding
    position j of the target maps to position j of the source (alpha 1).

    Returns (index, alpha), each (S,), as :func:`align_tokens`.
    """
    length = tokenizer.model_max_length
    x = tokenizer(source, truncation=True, max_length=length).input_ids
    y = tokenizer(target, truncation=True, max_length=length).input_ids
    return align_ids_photoswap(x, y, length)


def align_prompts_photoswap(model, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`align_tokens_photoswap` of two prompts as ``model`` conditions on them
    (:meth:`~components.personalized.PersonalizedModel.prompt_tokens`, padding and learned
    rows at the end left out of the alignment)."""
    tokenizer = model.components.tokenizer
    ids = [_unpadded(model.prompt_tokens(p), tokenizer) for p in (source, target)]
    return align_ids_photoswap(ids[0], ids[1], tokenizer.model_max_length)


def _unpadded(ids: Sequence[int], tokenizer) -> list[int]:
    """Token ids without the trailing padding (and learned rows), ending with the end token."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out = list(ids)
    while out and out[-1] in (pad, NO_TOKEN):
        out.pop()
    if eos is not None and eos in ids and (not out or out[-1] != eos):
        out.append(eos)  # CLIP pads with its end token
    return out


def align_ids_photoswap(x: Sequence[int], y: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global alignment of :func:`align_tokens_photoswap` on unpadded token ids."""
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    move = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]  # 1: skip a target token, 2: skip a source token, 3: pair
    for j in range(1, len(y) + 1):
        move[0][j] = 1
    for i in range(1, len(x) + 1):
        move[i][0] = 2
        for j in range(1, len(y) + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if left == best else 2 if up == best else 3
    index, alpha = torch.arange(length), torch.ones(length)  # padding: j -> j
    i, j = len(x), len(y)
    while i > 0 or j > 0:
        m = move[i][j] if i > 0 and j > 0 else (1 if j > 0 else 2)
        if m == 3:
            i, j = i - 1, j - 1
            index[j], alpha[j] = i, 1.0
        elif m == 1:
            j -= 1
            index[j], alpha[j] = 0, 0.0  # a target token without counterpart keeps its own map
        else:
            i -= 1
    return index, alpha


#: the concept phrase's own tokens in a prompt string (the default of
#: PersonalizedModel.concept_token_positions; samplers ask the model, see concept_weights)
concept_token_positions = phrase_token_positions


def superclass_token_positions(tokenizer, template: str, superclass: str) -> list[int]:
    """Positions of the superclass word's token(s) in the filled superclass prompt.

    The sampling study's code takes the superclass branch's map at the position of the
    identifier in the concept prompt, which is where the superclass word sits in the
    superclass prompt when the phrase is "<identifier> <superclass>" (one-token
    superclasses: the same position).
    """
    prefix = " ".join(template.split("{}")[0].split())
    n_prefix = len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0
    word = tokenizer(superclass, add_special_tokens=False).input_ids
    ids = token_ids(tokenizer, fill(template, superclass))
    start = n_prefix + _leading_special_tokens(tokenizer)
    if not word or ids[start : start + len(word)] != word:
        raise ValueError(
            f"could not locate the superclass {superclass!r} in the tokens of template {template!r}; "
            f"is the prompt longer than the tokenizer's {tokenizer.model_max_length} tokens?"
        )
    return list(range(start, start + len(word)))


def _leading_special_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer puts before the text (CLIP: 1, T5: 0)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    return next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)


def concept_token_weights(tokenizer, templates: Sequence[str], concept_phrase: str, superclass: str) -> torch.Tensor:
    """(B, S) weights, 1/n at each cell's n concept token positions."""
    return position_weights(
        tokenizer.model_max_length,
        [concept_token_positions(tokenizer, t, concept_phrase, superclass) for t in templates],
    )


def superclass_token_weights(tokenizer, templates: Sequence[str], superclass: str) -> torch.Tensor:
    """(B, S) weights, 1/n at each cell's n superclass-word positions of the superclass prompt."""
    return position_weights(
        tokenizer.model_max_length, [superclass_token_positions(tokenizer, t, superclass) for t in templates]
    )


def concept_weights(model, templates: Sequence[str]) -> torch.Tensor:
    """(B, S) weights, 1/n at each cell's n concept rows, as the model places them
    (:meth:`~components.personalized.PersonalizedModel.concept_token_positions`: the
    identifier, every vector of a new token, HiFi Tuner's c_s rows)."""
    length = len(model.prompt_tokens(fill(templates[0], model.concept_phrase))) if templates else 0
    positions = [model.concept_token_positions(t) for t in templates]
    for t, pos in zip(templates, positions):
        if not pos:
            raise ValueError(f"{type(model).__name__} names no concept token in template {t!r}")
    return position_weights(length, positions)


def position_weights(length: int, positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, length) weights, 1/n at each row's n positions."""
    weights = torch.zeros(len(positions), length)
    for b, pos in enumerate(positions):
        weights[b, list(pos)] = 1.0 / len(pos)
    return weights
