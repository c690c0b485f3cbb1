"""The shared base of every fine-tuning method.

The base owns what all methods share: the components, the diffusion loss (noise,
timestep, epsilon or v target from the scheduler config, prior preservation, optional
subject mask), caching of what is frozen (VAE latents, prompt embeddings), optimizer and
LR scheduler, and the artifact protocol. A method overrides three things:

- :meth:`configure_trainable` — what trains (freeze all, then unfreeze or inject);
- :meth:`encode_prompts` — how prompts become conditionings (new tokens, step-wise
  embeddings) — only if the default text encoder call is not enough;
- :meth:`save_artifact_files` / :meth:`load_artifact_files` — only what it trained.

Every method is also a :class:`components.personalized.PersonalizedModel`, so samplers,
callbacks and evaluation take the module itself.

How a method is built: its constructor only records its arguments (``self.hparams``;
a method writes each argument once, in its signature) and checks them; Lightning's
:meth:`configure_model` hook loads the components and calls :meth:`configure_trainable`.
The Trainer calls it at ``fit``/``validate``/``test``/``predict``; outside a Trainer,
call ``module.configure_model()`` (:func:`load_personalized` does). The artifact records
the method's own arguments (those beyond the base's), read back from ``self.hparams``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import safetensors
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from components.conditioning import Cond, cat
from components.errors import MissingFileError, UserError
from components.loader import DiffusionComponents, as_dtype, load_components
from components.personalized import fill, phrase_token_positions, text_tokens, tokenize

ARTIFACT_MANIFEST = "personalize.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _on_cpu():
    """Factory functions default to the CPU inside: a ``torch.device("cpu")`` context where
    another device is the default (a Trainer's init context on an accelerator), none where
    the CPU already is (that context is a TorchFunctionMode every torch call of the model's
    construction passes through: 0.04 CPU s of start-up on the MiniWorld model with LoRA)."""
    return contextlib.nullcontext() if torch.get_default_device().type == "cpu" else torch.device("cpu")


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


class PersonalizationModule(L.LightningModule):
    """Base LightningModule of the fine-tuning methods.

    Args:
        pretrained_model: base model: a diffusers pipeline folder, a hub id
            (``stabilityai/stable-diffusion-2-base``) or a tiny preset (``tiny``, ``tiny-v``).
        placeholder: the word standing for the concept (linked from the DataModule).
        superclass: the concept's class word (linked from the DataModule).
        learning_rate: learning rate of the default AdamW (ignored when ``optimizer`` is set).
        weight_decay: weight decay of the default AdamW.
        optimizer: optional optimizer factory (LightningCLI: ``class_path``/``init_args``).
        lr_scheduler: optional LR scheduler factory; stepped every optimizer step.
        lr_warmup_steps: linear warm-up steps of the default constant schedule.
        prior_loss_weight: weight of the prior-preservation loss (class images).
        masked_loss: weight the instance loss by the subject mask (``‖M⊙(ε̂−ε)‖²``).
        mask_dilation: with ``masked_loss``, grow the mask by this many image pixels first
            (a max filter): 0 is the paper's mask; a thin ring of background around the
            subject supervises its outline, which the mask alone leaves free to drift
            (README: the cube's corners).
        cache_latents: cache VAE latent distributions of deterministic images.
        cache_text: cache prompt embeddings while nothing on the text side trains.
        frozen_dtype: dtype of fully frozen modules (``fp32``, ``bf16``, ``fp16``), and
            of the frozen weights in partly trained ones where the method allows it
            (LoRA, SVDiff: ``casts_partly_trained``); trainable parameters always stay
            fp32 (use ``Trainer(precision=...)`` for mixed precision compute).
        gradient_checkpointing: trade compute for memory in the UNet (and the text
            encoder when it trains).
        compile: ``torch.compile`` the UNet (``components.compile``: true, a mode such
            as ``max-autotune``, or torch.compile keywords); static shapes, so keep the
            batch size fixed (``drop_last``) to compile once.
        seed: seed of the noise and timesteps; step ``k`` always draws the same ones,
            so a resumed run continues exactly. None (the default): train.py's
            ``seed_everything`` (0 outside it).
    """

    #: the default learning rate of a method (the paper's SD value), overridable
    default_learning_rate: float = 5e-6

    def __init__(
        self,
        pretrained_model: str = "tiny",
        placeholder: str = "sks",
        superclass: str = "",
        learning_rate: float | None = None,
        weight_decay: float = 1e-2,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_warmup_steps: int = 0,
        prior_loss_weight: float = 1.0,
        masked_loss: bool = False,
        mask_dilation: int = 0,
        cache_latents: bool = True,
        cache_text: bool = True,
        frozen_dtype: str = "fp32",
        gradient_checkpointing: bool = False,
        seed: int | None = None,
        compile: bool | str | dict = False,
    ):
        super().__init__()
        # records this method's arguments too (Lightning collects every __init__ of the chain)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.hparams["seed"] = 0 if seed is None else int(seed)  # what the checkpoint records
        from components.compile import compile_options

        compile_options(compile)  # a bad value fails now, not at the first step
        if frozen_dtype not in _DTYPES:
            raise UserError(f"frozen_dtype={frozen_dtype!r} is not a dtype here", fix=f"choose one of {sorted(_DTYPES)}")
        # settings that would only fail after the model loads, checked before it does
        for key, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay),
                           ("lr_warmup_steps", lr_warmup_steps), ("prior_loss_weight", prior_loss_weight),
                           ("mask_dilation", mask_dilation)):
            if value is not None and value < 0:
                raise UserError(f"model.{key} is {value}: it cannot be negative", fix=f"set model.{key} to 0 or more")
        if mask_dilation and not masked_loss:
            raise UserError(f"model.mask_dilation is {mask_dilation} but model.masked_loss is off: the dilation "
                            "grows the loss mask, and there is none", fix="set model.masked_loss: true (with "
                            "data.use_masks: true), or drop model.mask_dilation")
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.strict_loading = False  # checkpoints hold only what trains (see on_save_checkpoint)
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_cache: dict[str, Cond] = {}

    def configure_model(self) -> None:
        """Load the components and set up what trains (Lightning hook; idempotent, as
        Lightning calls it at every fit/validate/test/predict)."""
        if self.is_configured:
            return
        # Built as outside a Trainer (CPU, fp32): the Trainer's init context would put a
        # random-weight preset on the accelerator's RNG and trainable parameters in the
        # precision's dtype; the strategy moves the module afterwards, as before.
        with _on_cpu(), _default_dtype(torch.float32):
            c = load_components(self.hparams.pretrained_model)
            self.check_backbone(c.backbone)
            self.backbone = c.backbone
            self.tokenizer, self.noise_scheduler = c.tokenizer, c.scheduler
            self.tokenizer_2 = c.tokenizer_2
            self.text_encoder, self.text_encoder_2 = c.text_encoder, c.text_encoder_2
            self.unet, self.vae = c.unet, c.vae  # unet: the denoiser (PixArt-α: its transformer)
            for m in self.model_parts().values():
                m.requires_grad_(False)
                m.eval()
            self.configure_trainable()
        self._cast_frozen(_DTYPES[self.hparams.frozen_dtype])
        if self.hparams.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in self.text_encoders().values():
                if any(p.requires_grad for p in encoder.parameters()):
                    encoder.gradient_checkpointing_enable()
        if self.hparams.get("compile"):
            from components.compile import compile_unet

            compile_unet(self.unet, self.hparams.compile)

    @property
    def is_configured(self) -> bool:
        """Whether :meth:`configure_model` has built the components."""
        return "unet" in self._modules

    @property
    def learning_rate(self) -> float:
        lr = self.hparams.learning_rate
        return self.default_learning_rate if lr is None else lr

    @property
    def placeholder(self) -> str:
        return self.hparams.placeholder

    @property
    def superclass(self) -> str:
        return self.hparams.superclass

    # ------------------------------------------------------------------ method hooks

    def configure_trainable(self) -> None:
        """Unfreeze or inject what this method trains. Everything starts frozen."""
        raise NotImplementedError

    #: backbone name -> why this method does not apply to it (a clear error at construction)
    unsupported_backbones: dict[str, str] = {}

    def check_backbone(self, backbone) -> None:
        reason = self.unsupported_backbones.get(backbone.name)
        if reason:
            raise ValueError(f"{type(self).__name__} does not apply to {backbone.name} models: {reason}")

    @property
    def concept_phrase(self) -> str:
        """The words standing for the concept in prompts (slot ``{}`` of a template)."""
        return f"{self.placeholder} {self.superclass}".strip()

    timestep_dependent = False

    def encode_prompts(self, prompts: Sequence[str], timestep: int | None = None) -> Cond:
        """The backbone's conditionings of fully written prompts (PersonalizedModel):
        (B, L, D) hidden states, or hidden states with extras (components.conditioning)."""
        return self.components.encode(prompts)

    def prompt_tokens(self, prompt: str) -> list[int]:
        """The token id behind each conditioning row of a written prompt (PersonalizedModel);
        ``NO_TOKEN`` where the method writes learned vectors instead of tokens."""
        return text_tokens(self.tokenizer, prompt)

    def concept_token_positions(self, template: str) -> list[int]:
        """Conditioning rows of ``fill(template, concept_phrase)`` that carry the concept
        (PersonalizedModel). Default: the phrase's tokens that are not superclass tokens
        (DreamBooth's ``sks``); methods with new tokens or learned rows override it."""
        return phrase_token_positions(self.tokenizer, template, self.concept_phrase, self.superclass)

    def encode_training_prompts(self, prompts: Sequence[str], timesteps: torch.Tensor) -> Cond:
        """Conditionings for a training batch; cached while the text side is frozen."""
        if self.timestep_dependent:
            return cat([self.encode_prompts([p], int(t)) for p, t in zip(prompts, timesteps)])
        if self.hparams.cache_text and not self.text_trainable:
            return self.encode_prompts_cached(prompts)
        # a trained text side runs once per distinct prompt of the batch (a fixed instance
        # template gives one): the rows are copies, their gradients add up as if each were
        # encoded on its own
        unique = list(dict.fromkeys(prompts))
        if len(unique) == len(prompts):
            return self.encode_prompts(prompts)
        encoded = self.encode_prompts(unique)
        row = {p: i for i, p in enumerate(unique)}
        return cat([encoded[row[p] : row[p] + 1] for p in prompts])

    def encode_prompts_cached(self, prompts: Sequence[str]) -> Cond:
        """``encode_prompts(prompts)`` (no timestep), each distinct prompt encoded once
        while ``cache_text`` is on and nothing on the text side trains."""
        if not (self.hparams.cache_text and not self.text_trainable):
            return self.encode_prompts(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with torch.no_grad():
                encoded = self.encode_prompts(missing)
                for i, p in enumerate(missing):
                    self._text_cache[p] = encoded[i : i + 1]  # (1, L, D)
        return cat([self._text_cache[p] for p in prompts])

    def save_artifact_files(self, folder: Path) -> None:
        raise NotImplementedError

    def load_artifact_files(self, folder: Path) -> None:
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups; one group of all trainable parameters by default."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    # ------------------------------------------------------------------ components

    @property
    def components(self) -> DiffusionComponents:
        return DiffusionComponents(self.tokenizer, self.text_encoder, self.unet, self.vae, self.noise_scheduler,
                                   source=self.hparams.pretrained_model, tokenizer_2=self.tokenizer_2,
                                   text_encoder_2=self.text_encoder_2, backbone=self.backbone)

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """``{"text_encoder": ..., "text_encoder_2": ...}``: the backbone's text encoders."""
        return {n: getattr(self, n) for n in ("text_encoder", "text_encoder_2") if getattr(self, n, None) is not None}

    def model_parts(self) -> dict[str, torch.nn.Module]:
        """Every module of the base model: text encoder(s), denoiser, VAE."""
        return {**self.text_encoders(), "unet": self.unet, "vae": self.vae}

    @property
    def text_trainable(self) -> bool:
        return any(p.requires_grad for m in self.text_encoders().values() for p in m.parameters())

    def trainable_state_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    #: whether the method's layers run frozen weights in ``frozen_dtype`` next to fp32
    #: trained ones inside one module (peft's LoRA casts the input to its adapter's dtype
    #: and back; SVDiff adds its shift in the weight's dtype). Then the frozen parameters
    #: of partly trained modules follow ``frozen_dtype`` too, as diffusers' SD-XL LoRA
    #: script does; otherwise a partly trained module stays fp32.
    casts_partly_trained: bool = False

    def _cast_frozen(self, dtype: torch.dtype) -> None:
        for m in self.model_parts().values():
            if not any(p.requires_grad for p in m.parameters()):
                if m.dtype != dtype:
                    m.to(dtype=dtype)
            elif self.casts_partly_trained:
                cast_frozen_tensors(m, dtype)

    # ------------------------------------------------------------------ the loss

    def _generator(self, *salt: Any) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(_seed_of(self.hparams.seed, *salt))

    @torch.no_grad()
    def encode_latents(self, pixel_values: torch.Tensor, cache_keys: Sequence[str], generator: torch.Generator):
        """VAE latents × scaling factor, (B, C, h, w); latent distributions of images
        with a cache key are computed once."""
        vae_dtype = next(self.vae.parameters()).dtype
        keys = list(cache_keys) if self.hparams.cache_latents else [""] * len(pixel_values)
        todo = [i for i, k in enumerate(keys) if not k or k not in self._latent_cache]
        mean_std: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Cacheable images are encoded one at a time, so a cached latent never depends on
        # which other images shared its batch (a resumed run then matches bit for bit).
        groups = [[i] for i in todo if keys[i]] + ([[i for i in todo if not keys[i]]] if any(not keys[i] for i in todo) else [])
        for group in groups:
            dist = self.vae.encode(pixel_values[group].to(vae_dtype)).latent_dist
            for j, i in enumerate(group):
                mean_std[i] = (dist.mean[j].float(), dist.std[j].float())
                if keys[i]:
                    self._latent_cache[keys[i]] = mean_std[i]
        for i, k in enumerate(keys):
            if i not in mean_std:
                mean_std[i] = self._latent_cache[k]
        mean = torch.stack([mean_std[i][0] for i in range(len(keys))])
        std = torch.stack([mean_std[i][1] for i in range(len(keys))])
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        return (mean + std * eps) * self.vae.config.scaling_factor

    def diffusion_loss(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Denoising loss of one batch; returns ``loss`` and its parts."""
        latents = self.encode_latents(batch["pixel_values"], batch["cache_keys"], generator)  # (B, 4, h, w)
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        timesteps = self.sample_timesteps(bsz, generator, latents.device)  # (B,)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prompts = [fill(t, self.superclass if prior else self.concept_phrase)
                   for t, prior in zip(batch["templates"], batch["is_prior"].tolist())]
        cond = self.encode_training_prompts(prompts, timesteps)  # (B, L, D)
        unet_dtype = self.denoiser_dtype()
        pred = self.components.predict(noisy.to(unet_dtype), timesteps, cond.to(dtype=unet_dtype))  # (B, 4, h, w)
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unsupported prediction_type {self.noise_scheduler.config.prediction_type!r}.")
        err = (pred.float() - target.float()).pow(2)  # (B, 4, h, w)
        prior = batch["is_prior"].to(err.device)
        inst = ~prior
        if self.hparams.masked_loss:
            # ‖M⊙(ε̂−ε)‖²: the subject mask at latent resolution weights the instance loss
            m = batch["masks"].to(err)  # (B, 1, H, W)
            if self.hparams.mask_dilation:  # grow the mask by d pixels (max filter, (2d+1)²)
                d = self.hparams.mask_dilation
                m = F.max_pool2d(m, 2 * d + 1, stride=1, padding=d)
            m = F.interpolate(m, size=err.shape[-2:], mode="area")[inst]  # (b, 1, h, w)
            loss_inst = (err[inst] * m).sum() / (m.sum() * err.shape[1]).clamp_min(1.0)
        else:
            loss_inst = err[inst].mean()
        out = {"loss_instance": loss_inst}
        loss = loss_inst
        if prior.any():
            out["loss_prior"] = err[prior].mean()
            loss = loss + self.hparams.prior_loss_weight * out["loss_prior"]
        reg = self.regularization_loss()
        if torch.is_tensor(reg):
            out["loss_reg"] = reg  # logged with the other parts (train/loss_reg)
        out["loss"] = loss + reg
        return out

    def denoiser_dtype(self) -> torch.dtype:
        """The dtype the denoiser computes in: its first floating parameter's outside
        ``_keep_in_fp32_modules`` (diffusers' ``ModelMixin.dtype`` without its walk over
        every submodule for casting hooks, ~1 ms a training step on the MiniWorld UNet)."""
        keep = getattr(self.unet, "_keep_in_fp32_modules", None) or ()
        for name, p in self.unet.named_parameters():
            if p.is_floating_point() and not any(k in name for k in keep):
                return p.dtype
        return self.unet.dtype

    def sample_timesteps(self, bsz: int, generator: torch.Generator, device) -> torch.Tensor:
        """(B,) training timesteps, uniform over the scheduler's; a method may pick its own
        (HiFi Tuner's step-wise phase trains at one DDIM timestep at a time)."""
        return torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=device)

    def regularization_loss(self) -> torch.Tensor | float:
        """An extra loss term of the method (HiFi Tuner's parameter regularization)."""
        return 0.0

    # ------------------------------------------------------------------ Lightning hooks

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g = self._generator("train", self.global_step, self.global_rank)
        out = self.diffusion_loss(batch, g)
        bsz = len(batch["templates"])
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=False, batch_size=bsz)
        self.log("train_loss", out["loss"].detach(), prog_bar=True, logger=False, batch_size=bsz)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # fixed noise and timesteps, so val/loss is comparable across epochs
        out = self.diffusion_loss(batch, self._generator("val", batch_idx))
        self.log("val/loss", out["loss"], sync_dist=True, batch_size=len(batch["templates"]))
        return out["loss"]

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.diffusion_loss(batch, self._generator("test", batch_idx))
        self.log("test/loss", out["loss"], sync_dist=True, batch_size=len(batch["templates"]))
        return out["loss"]

    def configure_optimizers(self):
        groups = [g for g in self.parameter_groups() if g["params"]]
        if not groups:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters: check its configuration.")
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.learning_rate, weight_decay=self.hparams.weight_decay,
                                          **adamw_implementation([p for g in groups for p in g["params"]]))
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            warmup = max(self.hparams.lr_warmup_steps, 0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # frozen modules stay in eval mode (no dropout) while the module trains
        for m in self.model_parts().values():
            if not any(p.requires_grad for p in m.parameters()):
                m.eval()

    def checkpoint_keys(self) -> set[str]:
        """The state-dict keys a checkpoint holds: what trains, plus :meth:`extra_state_keys`."""
        return self.trainable_state_keys() | set(self.extra_state_keys())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Only what trains goes into the checkpoint: the frozen base reloads from its source.
        keep = self.checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def extra_state_keys(self) -> list[str]:
        """Non-parameter state-dict entries a method needs in its checkpoints."""
        return []

    # ------------------------------------------------------------------ artifacts

    def save_artifact(self, folder: str | os.PathLike, run: dict | None = None) -> Path:
        """Write only what was trained, plus ``personalize.json`` naming the method (and,
        given ``run``, which run made it: ``callbacks.export.run_identity``).

        Atomic: the files go to a temporary folder beside ``folder``, renamed into place when
        complete, so a crash never leaves half an artifact (an artifact already there is
        replaced only then)."""
        from components.atomic import atomic_path

        folder = Path(folder)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            self._write_artifact(tmp, run)
        return folder

    def _write_artifact(self, folder: Path, run: dict | None = None) -> None:
        self.save_artifact_files(folder)
        manifest = {
            "method": f"{type(self).__module__}.{type(self).__qualname__}",
            "pretrained_model": self.hparams.pretrained_model,
            "placeholder": self.placeholder,
            "superclass": self.superclass,
            "concept_phrase": self.concept_phrase,
            "init_args": self.artifact_init_args(),
        }
        if run is not None:
            manifest["run"] = run
        (folder / ARTIFACT_MANIFEST).write_text(json.dumps(manifest, indent=2))

    #: method arguments about how to compute, not what the model is (left out of artifacts)
    runtime_args: tuple[str, ...] = ()

    def artifact_init_args(self) -> dict:
        """Constructor arguments needed to rebuild the module before loading its files:
        the method's own arguments (every one beyond the base's), from ``self.hparams``."""
        base = set(inspect.signature(PersonalizationModule.__init__).parameters)
        # keys starting with "_" are what LightningCLI records about how it built the module
        # (``_class_path``, ``_instantiator``), not arguments of the method
        return {k: v for k, v in self.hparams.items()
                if k not in base and k not in self.runtime_args and not k.startswith("_")}

    def load_artifact(self, folder: str | os.PathLike) -> "PersonalizationModule":
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFileError(f"artifact folder {folder} does not exist",
                                   fix="pass the folder ExportArtifact wrote (personalize.json inside)")
        try:
            self.load_artifact_files(folder)
        except (OSError, EOFError, KeyError, safetensors.SafetensorError) as err:  # missing, truncated, foreign files
            raise UserError(f"artifact {folder} is damaged or incomplete ({type(err).__name__}: {err})",
                            fix="export the artifact again (ExportArtifact, or module.save_artifact)") from err
        self._text_cache.clear()
        return self


def cast_frozen_tensors(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Frozen floating-point parameters and buffers of ``module`` to ``dtype``; trained
    parameters stay as they are, and so do the buffers a submodule names in
    ``keep_fp32_buffers`` (SVDiff's σ, read with the fp32 shifts)."""
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None and not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        keep = getattr(sub, "keep_fp32_buffers", ())
        for name, b in sub._buffers.items():
            if b is not None and name not in keep and b.is_floating_point() and b.dtype != dtype:
                sub._buffers[name] = b.to(dtype)


def adamw_implementation(params: list[torch.Tensor]) -> dict:
    """``fused=True`` where torch has a fused AdamW kernel for every parameter (floating
    point, on CPU or CUDA): one kernel over all tensors instead of torch's default on CPU,
    a Python loop of ~10 ops per tensor (4x faster on the MiniWorld UNet's 286 tensors).
    The update is the same AdamW to float rounding."""
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if fused else {}


def read_artifact_manifest(folder: str | os.PathLike) -> dict:
    """The artifact's ``personalize.json``, checked: every problem is a :class:`UserError`
    naming the file (a folder that is not an artifact, a damaged or foreign manifest, a
    method that does not take its arguments)."""
    folder = Path(folder)
    path = folder / ARTIFACT_MANIFEST
    if not folder.is_dir():
        raise MissingFileError(f"artifact folder {folder} does not exist",
                               fix="pass the folder ExportArtifact wrote (personalize.json inside)")
    if not path.exists():
        raise MissingFileError(f"{folder} is not an artifact folder: {ARTIFACT_MANIFEST} is missing",
                               fix="pass a folder written by ExportArtifact at the end of training, or by "
                                   "module.save_artifact(folder)")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise UserError(f"{path} is damaged ({err})", fix="export the artifact again") from err
    missing = [k for k in ("method", "pretrained_model", "placeholder", "superclass") if k not in manifest]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}", fix="export the artifact again")
    cls = method_class(manifest["method"], where=str(path))
    # the arguments the class takes: its __init__'s and, through **kwargs, its bases'
    params = {name for klass in cls.__mro__ if issubclass(klass, PersonalizationModule)
              for name in inspect.signature(klass.__init__).parameters}
    if not isinstance(manifest.get("init_args") or {}, dict):
        raise UserError(f"{path}: init_args is not a mapping", fix="export the artifact again")
    # artifacts written before the fix above may hold LightningCLI's "_class_path"/"_instantiator"
    manifest["init_args"] = {k: v for k, v in (manifest.get("init_args") or {}).items() if not k.startswith("_")}
    unknown = sorted(set(manifest["init_args"]) - params)
    if unknown:
        raise UserError(f"{path}: {cls.__name__} takes no argument {', '.join(unknown)} (the artifact was made by "
                        "another version or another method)", fix="export the artifact again with this version")
    return manifest


def method_class(path: str, where: str = "method") -> type:
    """The fine-tuning method class named by ``path`` (``lightning_modules.DreamBooth``);
    a UserError listing the methods if it is not one."""
    import lightning_modules

    known = [n for n in lightning_modules.__all__ if isinstance(getattr(lightning_modules, n), type)
             and issubclass(getattr(lightning_modules, n), PersonalizationModule) and n != "PersonalizationModule"]
    module_name, _, cls_name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "lightning_modules"), cls_name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, PersonalizationModule)):
        raise UserError(f"{where}: {path!r} is not a fine-tuning method",
                        fix="use one of " + ", ".join(f"lightning_modules.{n}" for n in known))
    return cls


def load_personalized(base_source: str | None = None, artifact: str | os.PathLike | None = None,
                      dtype: str | torch.dtype | None = None, **overrides):
    """A :class:`~components.personalized.PersonalizedModel` for sampling and evaluation.

    ``dtype`` (``"bfloat16"``, ``torch.float16``, ...): the whole model, trained parts
    included, in that dtype for inference (default: as loaded, fp32).

    ``artifact``: a folder written by any method's ``save_artifact``; its manifest names
    the method class, which is rebuilt on ``base_source`` (default: the base model the
    artifact was trained on) and loads the artifact. Without an artifact, the plain base
    model (:class:`~components.personalized.BaseModel`).
    """
    from components.personalized import BaseModel

    if artifact is None:
        if base_source is None:
            raise ValueError("Give a base model (hub id, folder, 'tiny') or an artifact folder.")
        kw = {k: v for k, v in overrides.items() if k in ("superclass", "placeholder")}
        components = load_components(base_source)
        return BaseModel(components.to(dtype=as_dtype(dtype)) if dtype is not None else components, **kw)
    manifest = read_artifact_manifest(artifact)
    cls = method_class(manifest["method"])
    kwargs = dict(manifest.get("init_args", {}))
    kwargs.update(pretrained_model=base_source or manifest["pretrained_model"],
                  placeholder=manifest["placeholder"], superclass=manifest["superclass"])
    kwargs.update(overrides)
    model = cls(**kwargs)
    model.configure_model()
    model.load_artifact(artifact)
    if dtype is not None:
        model.to(dtype=as_dtype(dtype))
    return model.eval()

