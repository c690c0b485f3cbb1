"""The judge: a small CNN that reads scene, shape, colour, pattern and finish off an image.

Trained on the world's ground truth, it is what the quality script uses to check that a
generated image shows what its prompt asked for. Generated images pass through the VAE
decoder, so part of the training images are VAE reconstructions (when a VAE is given)
and part are blurred or noised: the judge then reads decoder output as well as clean
renders, and its accuracy on both is reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from miniworld.data import LABEL_NAMES, LABELS, rendered, to_tensor
from miniworld.loop import train

HEADS = {k: len(LABEL_NAMES[k]) for k in LABELS}


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Judge(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> logits per label (scene, shape, colour, pattern, finish)."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w), _block(w, w), nn.MaxPool2d(2),  # 16x16
            _block(w, 2 * w), _block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
            _block(2 * w, 4 * w), nn.MaxPool2d(2),  # 4x4
            _block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w, n) for k, n in HEADS.items()})
        self.width = width

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Class indices per label for a batch of images in [-1, 1]."""
        self.eval()
        out = [{k: v.argmax(1) for k, v in self(b).items()} for b in x.split(batch_size)]
        return {k: torch.cat([o[k] for o in out]) for k in HEADS}

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), folder / "judge.safetensors")
        (folder / "config.json").write_text(json.dumps(dict(width=self.width, labels=LABEL_NAMES), indent=2) + "\n")
        return folder


def load_judge(folder: str | Path) -> Judge:
    folder = Path(folder)
    if not (folder / "judge.safetensors").exists():
        raise FileNotFoundError(f"No judge in {folder}: train one with python -m miniworld train-judge --out {folder}")
    cfg = json.loads((folder / "config.json").read_text())
    if cfg["labels"] != {k: list(v) for k, v in LABEL_NAMES.items()}:
        raise ValueError(f"The judge in {folder} was trained on a different world vocabulary; retrain it.")
    judge = Judge(cfg["width"])
    judge.load_state_dict(load_file(folder / "judge.safetensors"))
    return judge.eval()


@torch.no_grad()
def vae_roundtrip(vae, x: torch.Tensor, sample: bool = True, batch_size: int = 256) -> torch.Tensor:
    """Encode and decode; ``sample=False`` takes the posterior mode (deterministic)."""
    out = []
    for b in x.split(batch_size):
        post = vae.encode(b).latent_dist
        out.append(vae.decode(post.sample() if sample else post.mode()).sample.clamp(-1, 1))
    return torch.cat(out)


def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur (down-up sampling) and noise on a third of the batch each."""
    b = len(x)
    pick = torch.rand(b, generator=gen)
    blurred = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.where((pick < 0.33)[:, None, None, None], blurred, x)
    noisy = x + 0.1 * torch.randn(x.shape, generator=gen)
    return torch.where((pick > 0.67)[:, None, None, None], noisy, x).clamp(-1, 1)


def accuracy(judge: Judge, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    pred = judge.predict(x)
    return {k: float((pred[k] == labels[:, i]).float().mean()) for i, k in enumerate(LABELS)}


def train_judge(out: str | Path, seed: int = 0, num_images: int = 40000, size: int = 32, steps: int = 2000,
                batch_size: int = 64, lr: float = 2e-3, vae: str | None = "miniworld/pretrained/vae") -> Judge:
    """Train on ``World(seed)`` renders (plus VAE reconstructions), report held-out accuracy, save."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data, held = rendered(seed, num_images, size), rendered(seed + 1, 2000, size)
    x, y = to_tensor(data["images"]), torch.from_numpy(data["labels"]).long()
    hx, hy = to_tensor(held["images"]), torch.from_numpy(held["labels"]).long()
    if vae and Path(vae).is_dir():
        from diffusers import AutoencoderKL

        ae = AutoencoderKL.from_pretrained(vae).eval()
        n = len(x) // 4  # a quarter of the training set, through the VAE
        x = torch.cat([x, vae_roundtrip(ae, x[:n])])
        y = torch.cat([y, y[:n]])
        held_vae = vae_roundtrip(ae, hx, sample=False)
    else:
        held_vae = None
    judge = Judge()

    def step(_: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        logits = judge(degrade(x[idx], gen))
        return {"loss": sum(F.cross_entropy(logits[k], y[idx, i]) for i, k in enumerate(LABELS))}

    train("judge", judge.parameters(), step, steps, lr, weight_decay=1e-4, warmup=0)  # no warm-up
    judge.eval()
    print("judge held-out accuracy, clean renders:", _fmt(accuracy(judge, hx, hy)))
    if held_vae is not None:
        print("judge held-out accuracy, VAE reconstructions:", _fmt(accuracy(judge, held_vae, hy)))
    judge.save(out)
    return judge


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items())
