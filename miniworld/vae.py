"""Stage 1 of the MiniWorld model: a small AutoencoderKL for 32 px images.

The tiny preset's VAE layout (three blocks, 4x downsampling, 4 latent channels: a
32 px image becomes an 8x8x4 latent) is trained on rendered world images with an MSE
reconstruction loss and a light KL term, as Stable Diffusion's VAE but without the
perceptual and adversarial losses (the world is flat colours and simple textures).
Afterwards ``scaling_factor`` is set to 1 / std of the latents, so scaled latents have
unit variance as the diffusion model expects; diffusers' pipeline reads it from the
config. Trained by the shared loop of :mod:`miniworld.loop`, a few minutes on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from components.loader import TINY_CONFIG
from miniworld.data import rendered, to_tensor
from miniworld.loop import train


def build_vae(size: int = 32) -> AutoencoderKL:
    return AutoencoderKL(**dict(TINY_CONFIG["vae"], sample_size=size))


@torch.no_grad()
def psnr(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 128) -> float:
    """Mean PSNR (dB, images in [0, 1]) of deterministic (posterior-mode) reconstructions."""
    errs = []
    for x in images.split(batch_size):
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        errs.append(((rec - x) / 2).pow(2).flatten(1).mean(1))
    return float((-10 * torch.log10(torch.cat(errs))).mean())


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor) -> float:
    return float(torch.cat([vae.encode(x).latent_dist.sample() for x in images.split(128)]).std())


def train_vae(out: str | Path, seed: int = 0, num_images: int = 40000, size: int = 32, steps: int = 1500,
              batch_size: int = 32, lr: float = 1e-3, kl_weight: float = 1e-4, log_every: int = 100,
              init: str | Path | None = None) -> AutoencoderKL:
    """Train, set ``scaling_factor``, save to ``out`` (a diffusers model folder) and return the VAE.
    ``init``: continue from a saved VAE folder instead of random weights."""
    torch.manual_seed(seed)
    images = to_tensor(rendered(seed, num_images, size)["images"])
    held_out = to_tensor(rendered(seed + 1, 2000, size)["images"])
    vae = AutoencoderKL.from_pretrained(init).train() if init else build_vae(size)

    def step(_: int) -> dict[str, torch.Tensor]:
        x = images[torch.randint(len(images), (batch_size,))]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = (rec - x).pow(2).mean()
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        return {"loss": mse + kl_weight * kl, "mse": mse, "kl": kl}

    train("vae", vae.parameters(), step, steps, lr, weight_decay=0.0, log_every=log_every,
          formats={"mse": ".4f", "kl": ".3f"})
    vae.eval()
    std = latent_std(vae, held_out[:1024])
    vae.register_to_config(scaling_factor=1.0 / std)
    print(f"vae held-out PSNR {psnr(vae, held_out):.2f} dB, latent std {std:.3f} -> scaling_factor {1 / std:.4f}")
    vae.save_pretrained(out)
    return vae
