"""Stage 2 of the MiniWorld model: text-to-image pretraining from scratch.

:class:`TextToImagePretraining` trains a UNet2DConditionModel and a CLIP text encoder
together, on top of the frozen stage-1 VAE (:mod:`miniworld.vae`), with the standard
latent-diffusion loss: encode the image, add noise at a uniform random timestep of the
DDPM schedule, predict the noise (or v), with min-SNR loss weighting (diffusers'
``compute_snr``). A fraction of the
captions is replaced by the empty string (caption dropout), so the model also learns
the unconditional prediction that classifier-free guidance needs. An exponential moving
average of the weights (diffusers' ``EMAModel``) is kept and is what gets saved: a standard diffusers pipeline
folder, through :meth:`DiffusionComponents.save_pretrained`, at the end of training
(also when stopped by ``max_time``) and every ``save_every_n_steps``.

Run it through the project's CLI: ``python train.py fit --config configs/miniworld/pretrain.yaml``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from components.loader import TINY_CONFIG, DiffusionComponents
from components.tokenizer import build_tiny_tokenizer

#: Defaults of the MiniWorld model: the tiny preset's layout, with a wider UNet that
#: cross-attends to the text at both resolutions and a 64-wide text encoder.
UNET = dict(
    TINY_CONFIG["unet"], block_out_channels=(48, 96), cross_attention_dim=64,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TEXT_ENCODER = dict(TINY_CONFIG["text_encoder"], hidden_size=64, intermediate_size=128, projection_dim=64)


def lr_schedule(optimizer, warmup_steps: int, total_steps: int | None):
    """Linear warmup over ``warmup_steps``, then cosine decay to 10% at ``total_steps``
    (constant after the warmup when ``total_steps`` is None). The LR factor at step s < warmup
    is s / warmup (the library schedules' warmup; the shipped model was trained with
    (s + 1) / warmup, one step earlier); from the warmup on it is the old schedule's number.
    diffusers' ``get_cosine_schedule_with_warmup`` decays to 0, so transformers' sibling with
    ``min_lr_rate`` keeps the 10% floor."""
    warm = max(1, warmup_steps)
    if total_steps is None:
        return get_constant_schedule_with_warmup(optimizer, warm)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warm, total_steps, min_lr_rate=0.1)


def snr_loss_weights(scheduler, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min-SNR-gamma weights (Hang et al. 2023) per timestep: min(SNR, γ) / SNR for ε targets,
    min(SNR, γ) / (SNR + 1) for v targets (as diffusers' training examples)."""
    snr = compute_snr(scheduler, t)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def weight_average(parameters, decay: float) -> EMAModel:
    """diffusers' EMAModel with the decay warm-up min(decay, (1 + k) / (10 + k)) at its k-th
    update (k = 1, 2, ...). Its own count starts one lower (a first update that copies the
    weights, decay 0); update_after_step=-1 shifts it to the k above, as the hand-written
    average had (it read the trainer's global_step, k after the k-th optimizer step)."""
    return EMAModel(parameters, decay=decay, update_after_step=-1)


class TextToImagePretraining(L.LightningModule):
    """Pretrain a Stable-Diffusion-layout text-to-image model on MiniWorld.

    Args:
        vae: folder of the trained AutoencoderKL (frozen here).
        output_dir: where the diffusers pipeline folder is written.
        unet: UNet2DConditionModel config overrides on top of :data:`UNET`.
        text_encoder: CLIPTextConfig overrides on top of :data:`TEXT_ENCODER`.
        prediction_type: "epsilon" or "v_prediction".
        learning_rate, weight_decay, warmup_steps: AdamW with linear warmup, then cosine
            decay to 10% over ``trainer.max_steps`` (constant if max_steps is unset; :func:`lr_schedule`).
        caption_dropout: probability that a caption is replaced by "" (for CFG).
        snr_gamma: min-SNR-gamma loss weighting (0 disables it).
        ema_decay: decay of the weight average that is saved (0 saves the raw weights).
        save_every_n_steps: also write the pipeline folder every n steps (0: only at the end).
        seed: seed of the weight initialisation.
        init_from: a MiniWorld pipeline folder (e.g. ``miniworld/pretrained/sd``) whose UNet
            and text encoder weights this run starts from: continued pretraining (the
            configs must match it). None: a fresh initialisation.
    """

    def __init__(
        self,
        vae: str = "miniworld/pretrained/vae",
        output_dir: str = "miniworld/pretrained/sd",
        unet: dict | None = None,
        text_encoder: dict | None = None,
        prediction_type: str = "epsilon",
        learning_rate: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 200,
        caption_dropout: float = 0.1,
        snr_gamma: float = 5.0,
        ema_decay: float = 0.999,
        save_every_n_steps: int = 500,
        seed: int = 0,
        init_from: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not Path(vae).is_dir():
            raise FileNotFoundError(
                f"VAE folder {vae!r} not found. Train it first: python -m miniworld train-vae --out {vae}"
            )
        torch.manual_seed(seed)
        self.tokenizer = build_tiny_tokenizer()
        tok = self.tokenizer
        self.text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, **dict(TEXT_ENCODER, **(text_encoder or {})),
        ))
        self.unet = UNet2DConditionModel(**dict(UNET, **(unet or {})))
        self.vae = AutoencoderKL.from_pretrained(vae).eval().requires_grad_(False)
        self.scheduler = DDPMScheduler(prediction_type=prediction_type, **TINY_CONFIG["scheduler"])
        self.scheduler.register_to_config(set_alpha_to_one=False)
        if init_from is not None:  # continued pretraining: the weights of a saved pipeline
            from components.errors import MissingFileError

            if not (Path(init_from) / "unet").is_dir() or not (Path(init_from) / "text_encoder").is_dir():
                raise MissingFileError(f"init_from {init_from!r} is not a MiniWorld pipeline folder (unet/, text_encoder/)",
                                       fix="pass the folder the pretraining wrote, e.g. miniworld/pretrained/sd")
            self.unet.load_state_dict(UNet2DConditionModel.from_pretrained(init_from, subfolder="unet").state_dict())
            self.text_encoder.load_state_dict(
                CLIPTextModel.from_pretrained(init_from, subfolder="text_encoder").state_dict())
        # the weight average (unet, then text encoder); its state travels in checkpoints["ema"]
        self.ema = weight_average(self.trained_parameters(), ema_decay)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.unet.parameters(), *self.text_encoder.parameters()]

    # ------------------------------------------------------------------ training

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]  # (B, 77, D)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["pixel_values"]  # (B, 3, H, W) in [-1, 1]
        with torch.no_grad():
            latents = self.vae.encode(x).latent_dist.sample() * self.vae.config.scaling_factor  # (B, 4, h, w)
        drop = torch.rand(len(x)) < self.hparams.caption_dropout
        captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
        cond = self.encode_captions(captions)

        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x),), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = noise if self.hparams.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, t)
        pred = self.unet(noisy, t, cond).sample

        loss = F.mse_loss(pred, target, reduction="none").mean((1, 2, 3))  # (B,)
        if self.hparams.snr_gamma > 0:
            loss = loss * snr_loss_weights(self.scheduler, t, self.hparams.snr_gamma, self.hparams.prediction_type)
        loss = loss.mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_fit_start(self) -> None:
        self.ema.to(self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # warm-up of the decay: early averages do not drag in the random initialisation
        # for thousands of steps (see weight_average)
        self.ema.step(self.trained_parameters())
        n = self.hparams.save_every_n_steps
        if n and self.global_step % n == 0:
            self.save_pipeline()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.ema.load_state_dict(checkpoint["ema"])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.trained_parameters(), lr=self.hparams.learning_rate,
                                weight_decay=self.hparams.weight_decay)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        sched = lr_schedule(opt, self.hparams.warmup_steps, total)
        return dict(optimizer=opt, lr_scheduler=dict(scheduler=sched, interval="step"))

    # ------------------------------------------------------------------ artifact

    def components(self, ema: bool = True) -> DiffusionComponents:
        """The model as :class:`DiffusionComponents` (copies; EMA weights by default)."""
        unet, text_encoder = copy.deepcopy(self.unet).eval(), copy.deepcopy(self.text_encoder).eval()
        if ema and self.hparams.ema_decay > 0:
            self.ema.copy_to([*unet.parameters(), *text_encoder.parameters()])
        return DiffusionComponents(
            self.tokenizer, text_encoder, unet, copy.deepcopy(self.vae).eval(), copy.deepcopy(self.scheduler),
            source="miniworld",
        )

    def save_pipeline(self, folder: str | None = None) -> Path:
        if self.trainer is not None and not self.trainer.is_global_zero:
            return Path(folder or self.hparams.output_dir)
        return self.components().to(device="cpu").save_pretrained(folder or self.hparams.output_dir)

    def on_train_end(self) -> None:
        path = self.save_pipeline()
        print(f"MiniWorld text-to-image model saved to {path} (step {self.global_step})")
