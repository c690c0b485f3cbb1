"""HiFi Tuner's textual inversion (Wang et al., 2023, Sec. 3.2): n learned vectors c_s in
the padding of the prompt embedding, with mask guidance, parameter regularization and
step-wise subject representations (Algorithm 1).

Notation (paper -> code):

    c        text-encoder output of the prompt, (L, D)           self.components.encode(...)
    ϕ        the null-text ("") embedding, (L, D)
    ϕ_s      its last n vectors, (n, D)                          self.null_tail
    c_s      the learned vectors, (n, D)                         self.embeddings[0]  (global_embedding)
    c_s^t    per DDIM step t_k, (n, D) each                      self.embeddings[1 + k]  (stepwise_embeddings[k])
    [c, c_s] c with its last n vectors replaced by c_s           substitute()

How the concept is marked in prompts: the concept phrase is ``"<placeholder> <superclass>"``
("sks dog"). A prompt holding the placeholder word is written without it ("a photo of
dog") and gets c_s in its last n positions; every other prompt (the superclass prompt,
the empty prompt of classifier-free guidance) is encoded unchanged. No token is added
to the tokenizer.

SD-XL: the conditioning's rows are both CLIP encoders' penultimate hidden states side by
side, (77, 768 + 1280), so each row of c_s (and of every c_s^t) is one vector per encoder,
[c_s^L | c_s^G], and ϕ_s is both encoders' rows for "" (as the encoders give them, not the
zeros SD-XL's pipeline uses for the unconditional prompt: zeros would make the n rows
identical, and they would stay so). The pooled embedding (``text_embeds``) is the text's
without the placeholder: c_s enters through cross-attention only, as on SD. PixArt-α is
not supported (its T5 mask hides the padding rows c_s would occupy).

Training (one Lightning run of ``global_steps + num_ddim_steps · steps_per_timestep``
optimizer steps): steps below ``global_steps`` train c_s at uniformly random timesteps;
then phase k = (step − global_steps) // I trains c_s^{t_k} at the k-th DDIM timestep
only (t_0 = T, the noisiest), initialised from c_s^{t_{k−1}} (c_s for k = 0). The phase
depends only on the global step, so checkpoints resume mid-algorithm.

Sampling: ``encode_prompts(prompts, timestep)`` uses the embedding of the DDIM step
nearest to ``timestep`` (eq. 7); ``timestep_dependent`` tells samplers to ask per step.

Artifact: ``hifi_embeddings.safetensors`` with ``global`` (n, D) and, with step-wise
embeddings, ``stepwise`` (S, n, D) and ``timesteps`` (S,).

All embeddings are rows of one parameter, ``embeddings`` (1 + S, n, D), indexed by the
phase: every step uses it, so plain ``strategy: ddp`` trains HiFi Tuner on many GPUs. Only
the row of the current phase may change: when a phase begins its optimizer state starts
afresh (as a new parameter's would), and the other rows are put back after each optimizer
step (weight decay or momentum would otherwise move them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file, save_file
from torch import nn

from components.conditioning import Cond, cat, hidden_states, with_hidden_states
from components.personalized import NO_TOKEN, fill, text_tokens
from lightning_modules.base import PersonalizationModule

EMBEDDINGS_FILE = "hifi_embeddings.safetensors"


class HiFiTextualInversion(PersonalizationModule):
    """HiFi Tuner's subject representation learning (textual inversion).

    Each technique of the paper's ablation is a switch: ``masked_loss`` (mask guidance,
    eq. 5), ``reg_weight`` (parameter regularization, eq. 6; 0 = off) and ``stepwise``
    (step-wise representations, Algorithm 1).

    Args:
        num_tokens: n, the number of learned vectors (paper: 5).
        reg_weight: w_s of eq. 6. The paper gives no value; the default makes the term
            of the order of the diffusion loss (~0.1) when c_s has drifted by ~0.5 per
            element on SD (n·D = 5·1024).
        stepwise: learn one embedding per DDIM step after the global phase.
        global_steps: optimizer steps of the global phase (paper: 1000).
        num_ddim_steps: DDIM steps S of the step-wise phase (paper: 50).
        steps_per_timestep: I, optimizer steps per DDIM step (paper: 10).
        masked_loss: mask guidance, ``‖M⊙(ε̂−ε)‖²``; needs subject masks (on by default).
        **kwargs: see :class:`~lightning_modules.base.PersonalizationModule`
            (weight decay defaults to 0 here: eq. 6 already regularises c_s).
    """

    default_learning_rate = 5e-3  # HiFi Tuner, Adam (paper, Sec. 4)
    unsupported_backbones = {
        "pixart-alpha": "its c_s sits in padding positions, which PixArt-α's T5 attention mask hides from the "
                        "transformer; use DreamBooth or LoRA on PixArt-α.",
    }

    def __init__(self, *args, num_tokens: int = 5, reg_weight: float = 1e-4, stepwise: bool = True,
                 global_steps: int = 1000, num_ddim_steps: int = 50, steps_per_timestep: int = 10,
                 masked_loss: bool = True, weight_decay: float = 0.0, **kwargs):
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens}: HiFi Tuner learns at least one vector (paper: 5).")
        if stepwise and (num_ddim_steps < 1 or steps_per_timestep < 1):
            raise ValueError("stepwise embeddings need num_ddim_steps >= 1 and steps_per_timestep >= 1.")
        super().__init__(*args, masked_loss=masked_loss, weight_decay=weight_decay, **kwargs)

    # ------------------------------------------------------------------ parameters

    def configure_trainable(self) -> None:
        n = self.hparams.num_tokens
        if self.tokenizer.model_max_length < n + 2:
            raise ValueError(f"num_tokens={n} does not fit in the {self.tokenizer.model_max_length}-token prompt.")
        with torch.no_grad():
            # (L, D): ϕ, the encoders' rows for "" (SD-XL: both encoders' rows side by side, as
            # the encoders give them, not the zeros its pipeline uses for guidance)
            null = hidden_states(self.backbone.encode_text_rows(self.components, [""]))[0].float()
        self.register_buffer("null_tail", null[-n:].clone(), persistent=False)  # (n, D): ϕ_s
        rows = 1 + (self.num_ddim_steps if self.stepwise else 0)
        # (1 + S, n, D): c_s, then c_s^{t_k} per DDIM step, all initialised to ϕ_s; one parameter
        # indexed by the phase, so every step uses it (plain DDP needs that)
        self.embeddings = nn.Parameter(self.null_tail.clone().repeat(rows, 1, 1))
        if self.stepwise:
            sched = self.components.ddim_scheduler()
            sched.set_timesteps(self.num_ddim_steps)
            self.register_buffer("stepwise_timesteps", sched.timesteps.clone().long())  # (S,), T first
            # number of step-wise phases started (their embeddings initialised from the previous step)
            self.register_buffer("phases_started", torch.zeros((), dtype=torch.long))

    # the paper's symbols, read from the hyperparameters
    num_tokens = property(lambda self: self.hparams.num_tokens)
    stepwise = property(lambda self: self.hparams.stepwise)
    global_steps = property(lambda self: self.hparams.global_steps)
    num_ddim_steps = property(lambda self: self.hparams.num_ddim_steps)
    steps_per_timestep = property(lambda self: self.hparams.steps_per_timestep)

    @property
    def global_embedding(self) -> torch.Tensor:
        """(n, D): c_s, row 0 of ``embeddings``."""
        return self.embeddings[0]

    @property
    def stepwise_embeddings(self) -> torch.Tensor:
        """(S, n, D): c_s^{t_k} as trained so far, rows 1 ... S of ``embeddings``."""
        return self.embeddings[1:]

    def extra_state_keys(self) -> list[str]:
        return ["stepwise_timesteps", "phases_started"] if self.stepwise else []

    @property
    def timestep_dependent(self) -> bool:
        return self.stepwise

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole algorithm: the global phase, then S·I step-wise steps."""
        return self.global_steps + (self.num_ddim_steps * self.steps_per_timestep if self.stepwise else 0)

    def phase(self, step: int | None = None) -> int:
        """-1 in the global phase, else the index k of the DDIM step being trained."""
        step = self.global_step if step is None else step
        if not self.stepwise or step < self.global_steps:
            return -1
        return min((step - self.global_steps) // self.steps_per_timestep, self.num_ddim_steps - 1)

    def stepwise_table(self) -> torch.Tensor:
        """(S, n, D): c_s^{t_k} per DDIM step; steps not trained yet repeat the last trained
        one (Algorithm 1's initialisation c_s^t = c_s^{t+1}), or c_s if none is."""
        started, rows, last = int(self.phases_started), [], self.global_embedding
        for k in range(self.num_ddim_steps):
            last = self.stepwise_embeddings[k] if k < started else last
            rows.append(last)
        return torch.stack(rows)

    def embedding_at(self, timestep: int | None) -> torch.Tensor:
        """(n, D): the embedding used at a denoising timestep (eq. 7); c_s without step-wise."""
        if timestep is None or not self.stepwise:
            return self.global_embedding
        k = int((self.stepwise_timesteps - int(timestep)).abs().argmin())
        return self.stepwise_table()[k]

    def training_embedding(self) -> torch.Tensor:
        """(n, D): the embedding the current optimizer step trains: row 0 (c_s) in the global
        phase, row 1 + k (c_s^{t_k}) in phase k."""
        return self.embeddings[1 + self.phase()]

    # ------------------------------------------------------------------ prompts

    def _split_marked(self, prompts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        """Prompts without the placeholder word, and which of them held it, (B,) bool."""
        pattern = re.compile(rf"(?<!\S){re.escape(self.placeholder)}(?!\S)")
        marked = [bool(pattern.search(p)) for p in prompts]
        texts = [" ".join(pattern.sub(" ", p).split()) for p in prompts]
        return texts, torch.tensor(marked)

    def substitute(self, cond: Cond, marked: torch.Tensor, c_s: torch.Tensor) -> Cond:
        """[c, c_s]: the last n vectors of the marked prompts' embeddings become c_s; the
        backbone's extras (SD-XL's pooled embedding of the text without the placeholder)
        stay as they are.

        cond: hidden states c (B, L, D), or a Conditioning of them; marked: (B,) bool; c_s: (n, D)."""
        n, c = self.num_tokens, hidden_states(cond)
        tail = torch.where(marked.to(c.device)[:, None, None], c_s.to(c.dtype).expand(c.shape[0], n, -1), c[:, -n:])
        return with_hidden_states(cond, torch.cat([c[:, :-n], tail], dim=1))  # (B, L, D)

    def encode_prompts(self, prompts: Sequence[str], timestep: int | None = None) -> Cond:
        texts, marked = self._split_marked(prompts)
        c = self.components.encode(texts)  # (B, L, D) (SD: the text encoder's last hidden states)
        return self.substitute(c, marked, self.embedding_at(timestep))

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The text tokens of the prompt without the placeholder; a marked prompt's last n
        rows are c_s (``NO_TOKEN``)."""
        texts, marked = self._split_marked([prompt])
        ids = text_tokens(self.tokenizer, texts[0])
        if marked[0]:
            ids[-self.num_tokens:] = [NO_TOKEN] * self.num_tokens
        return ids

    def concept_token_positions(self, template: str) -> list[int]:
        """The last n rows, where c_s (c_s^t) sits: the placeholder is not in the text the
        encoder reads, so a position in the prompt string would point at the wrong token."""
        length = len(self.prompt_tokens(fill(template, self.concept_phrase)))
        return list(range(length - self.num_tokens, length))

    def encode_training_prompts(self, prompts: Sequence[str], timesteps: torch.Tensor) -> Cond:
        """Training: the embedding of the current phase; evaluation: that of each timestep.
        The frozen text encoder's outputs are cached; c_s is substituted after (with grad)."""
        texts, marked = self._split_marked(prompts)
        c = self.encode_prompts_cached(texts)  # (B, L, D): the texts hold no placeholder, so c is the text encoder's
        if self.training:
            return self.substitute(c, marked, self.training_embedding())
        return cat([self.substitute(c[i:i + 1], marked[i:i + 1], self.embedding_at(int(t)))
                          for i, t in enumerate(timesteps)])

    # ------------------------------------------------------------------ Algorithm 1

    def sample_timesteps(self, bsz: int, generator: torch.Generator, device) -> torch.Tensor:
        k = self.phase() if self.training else -1
        if k < 0:
            return super().sample_timesteps(bsz, generator, device)
        return self.stepwise_timesteps[k].to(device).expand(bsz)  # (B,): only the k-th DDIM timestep

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Algorithm 1: c_s^t = c_s^{t+1} when the phase of DDIM step t begins
        k = self.phase()
        if k >= 0 and int(self.phases_started) <= k:
            with torch.no_grad():
                for j in range(int(self.phases_started), k + 1):
                    self.embeddings[1 + j].copy_(self.embeddings[j])  # row j: c_s (j = 0) or c_s^{t_{j-1}}
            self.phases_started.fill_(k + 1)
            # a new embedding starts with a fresh optimizer state (Adam's moments and step count),
            # as a parameter of its own would; the rows of finished phases then get no updates
            for optimizer in self.trainer.optimizers:
                optimizer.state.pop(self.embeddings, None)

    def optimizer_step(self, *args, **kwargs) -> None:
        # only the current phase's row trains: put the others back after the update
        row, before = 1 + self.phase(), self.embeddings.detach().clone()
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.embeddings[:row].copy_(before[:row])
            self.embeddings[row + 1:].copy_(before[row + 1:])

    def regularization_loss(self) -> torch.Tensor | float:
        """w_s ‖c_s − ϕ_s‖² of the embedding being trained (eq. 6)."""
        if self.hparams.reg_weight == 0 or not self.training:
            return 0.0
        return self.hparams.reg_weight * (self.training_embedding() - self.null_tail).pow(2).sum()

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.hparams.masked_loss and dm is not None and hasattr(dm, "concept_images"):
            missing = [str(c.path) for c in dm.concept_images if c.mask is None]
            if missing:
                raise ValueError(
                    f"HiFi Tuner's mask guidance needs subject masks: {len(missing)} of {len(dm.concept_images)} "
                    f"concept images have none (first: {missing[0]}). Add '<name>_mask.png' next to each image "
                    "(white = subject, e.g. from Segment Anything), or switch mask guidance off with "
                    "model.init_args.masked_loss: false."
                )
        max_steps = self.trainer.max_steps
        if self.stepwise and not self.trainer.fast_dev_run and (max_steps == -1 or max_steps > self.total_steps):
            raise ValueError(
                f"HiFi Tuner's Algorithm 1 takes global_steps + num_ddim_steps x steps_per_timestep = {self.total_steps} "
                f"optimizer steps; set trainer.max_steps: {self.total_steps} (got {max_steps})."
            )
        if self.stepwise and 0 < max_steps < self.total_steps:
            rank_zero_warn(f"max_steps={max_steps} stops HiFi Tuner before the last DDIM step ({self.total_steps} "
                           "steps in all); untrained steps reuse the last trained embedding.")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)  # logs train/loss_reg with the other loss parts
        self.log("train/hifi_phase", float(self.phase()), batch_size=1)
        return loss

    # ------------------------------------------------------------------ artifact

    def save_artifact_files(self, folder: Path) -> None:
        tensors = {"global": self.global_embedding}
        if self.stepwise:
            tensors.update(stepwise=self.stepwise_table(), timesteps=self.stepwise_timesteps)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / EMBEDDINGS_FILE))

    def load_artifact_files(self, folder: Path) -> None:
        state = load_file(str(folder / EMBEDDINGS_FILE))
        if state["global"].shape != self.global_embedding.shape:
            raise ValueError(f"{folder / EMBEDDINGS_FILE}: global embedding {tuple(state['global'].shape)} but this "
                             f"model learns {tuple(self.global_embedding.shape)}; rebuild with the artifact's num_tokens.")
        with torch.no_grad():
            self.global_embedding.copy_(state["global"])
            if self.stepwise:
                if "stepwise" not in state:
                    raise KeyError(f"{folder / EMBEDDINGS_FILE} has no step-wise embeddings: rebuild with stepwise=False.")
                if not torch.equal(state["timesteps"].long(), self.stepwise_timesteps.cpu()):
                    raise ValueError(f"{folder / EMBEDDINGS_FILE}: its DDIM timesteps differ from this model's "
                                     f"({self.num_ddim_steps} steps of the base scheduler); rebuild with its num_ddim_steps.")
                self.embeddings[1:].copy_(state["stepwise"])
                self.phases_started.fill_(self.num_ddim_steps)
