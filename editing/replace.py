"""Personalized subject replacement, HiFi Tuner's Algorithm 3 (§3.4).

Given an image, its caption c^r, the word naming its subject ("ball") and a personalized
model (any method with a concept phrase: HiFi Tuner with step-wise c_s^t, DreamBooth, TI,
...):

1. x_0^r = E(image); the pivotal DDIM inversion under c^r (eq. 3) gives [x_0*, …, x_T*].
2. Null-text optimization (eq. 4) from x_T* at guidance ω gives φ_t* per step; while it
   runs, the source prompt's cross-attention maps a_t^{r*} are stored per step and layer
   (A^(t)), only for the token columns that will be replayed.
3. The edit pass from x_T* uses c^g = the caption with the word replaced by the concept
   phrase (for HiFi Tuner: the same text plus c_s^t in its last rows), φ_t*, and F̃: every
   row of c^g aligned to a source token replays that token's stored map, except the free
   rows [c_s^t, w_g] (the concept's rows and the subject word), which attend freshly.

Defaults: 50 DDIM steps, ω = 7.5, K = 10 (null-text inversion's values; the paper gives
none for Algorithm 3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from components.errors import UserError
from components.personalized import fill, word_token_positions
from editing.inversion import Denoiser, denoise, encode_images, invert, null_text_optimization
from editing.prompt_to_prompt import CrossAttentionReplay, CrossAttentionStore, replacement_plan
from components.attention import attention_control
from components.pixels import decode


def caption_template(caption: str, word: str) -> str:
    """The caption with the first whole-word occurrence of ``word`` as the ``{}`` slot;
    UserError if the caption does not hold the word."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(word.strip())}(?![\w-])", re.IGNORECASE)
    if not word.strip() or not pattern.search(caption):
        raise UserError(f"the word {word!r} is not in the caption {caption!r}",
                        fix="pass --word as it is written in --caption (e.g. --caption 'a red ball on the beach' --word ball)")
    if "{" in caption or "}" in caption:
        raise UserError(f"the caption {caption!r} holds braces", fix="write the caption without '{' or '}'")
    return " ".join(pattern.sub("{}", caption, count=1).split())


@dataclass
class Replacement:
    image: torch.Tensor  # (3, H, W) in [0, 1]: the subject replaced
    reconstruction: torch.Tensor  # (3, H, W): null-text reconstruction of the input (edit-free check)
    source_prompt: str
    edit_prompt: str
    free_rows: list[int]
    cost: dict = field(default_factory=dict)


def replace_subject(model, image: torch.Tensor, caption: str, word: str, num_steps: int = 50, guidance: float = 7.5,
                    inner_steps: int = 10, lr: float = 1e-2, store_dtype=torch.float16,
                    progress: Callable[[str, int, int], None] | None = None) -> Replacement:
    """Algorithm 3 on one image (3, H, W) in [0, 1] (the model's resolution)."""
    template = caption_template(caption, word)
    edit = fill(template, model.concept_phrase)
    source = " ".join(caption.split())
    d = Denoiser(model, num_steps)
    tokenizer = model.components.tokenizer
    # free rows of the edit prompt: the concept's rows (c_s^t, new tokens, identifier) and w_g, the rows
    # standing where the source word stood
    from components.attention import align_prompts

    index, alpha = align_prompts(model, source, edit)
    word_rows = set(word_token_positions(tokenizer, source, word))
    free = set(model.concept_token_positions(template))
    free |= {j for j in range(len(index)) if alpha[j] > 0 and int(index[j]) in word_rows}
    columns, targets, slots = replacement_plan(model, source, edit, sorted(free))

    def tick(stage, total):
        return (lambda k: progress(stage, k + 1, total)) if progress is not None else None

    with torch.no_grad():
        x0 = encode_images(model.components, image[None])
    trajectory = invert(d, x0, [source], on_step=tick("invert", num_steps))
    store = CrossAttentionStore(columns, n_branches=1, branch=0, dtype=store_dtype)
    with attention_control(d.unet, store):
        null = null_text_optimization(d, trajectory, [source], guidance, inner_steps, lr, record=store,
                                      on_step=tick("null-text", num_steps))
    replay = CrossAttentionReplay(store, targets, slots, n_branches=2, branch=1)
    steps_done = []

    class _Progress:
        def set_step(self, i):
            replay.set_step(i)
            if progress is not None:
                steps_done.append(i)
                progress("edit", len(steps_done), num_steps)

    with attention_control(d.unet, replay):
        x = denoise(d, trajectory[-1], [edit], guidance, null=null.null, control=_Progress())
    with torch.no_grad():
        out = decode(model.components.vae, x).float().cpu()[0]
        rec = decode(model.components.vae, null.latents[-1]).float().cpu()[0]
    cost = {"unet_evals_per_image": d.rows, "optimizer_steps_per_image": d.optimizer_steps,
            "stored_attention_bytes": store.nbytes()}
    return Replacement(out, rec, source, edit, sorted(free), cost)
