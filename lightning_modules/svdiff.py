"""SVDiff (Han et al., 2023): fine-tune only the singular values of the weights.

Each weight W (conv kernels flattened to (out, in·k·k), 1-d norm weights to (1, n)) is
decomposed once, W = U·diag(σ)·Vᵀ, and the method learns a spectral shift δ per singular
value:

    W_δ = U·diag(relu(σ + δ))·Vᵀ                                    (SVDiff, eq. 1)

computed here as W + U·diag(relu(σ + δ) − σ)·Vᵀ: the same matrix up to the SVD's
reconstruction error (~1e-6), and exactly W while δ = 0, so the model starts
bit-identical to the base. The decomposition runs once at construction (U, σ, V are
non-persistent buffers, never saved); only δ trains, is checkpointed and exported.
Shifts of 1-d weights (norm layers) have their own learning rate (paper: 1e-6 next to
1e-3 for the others).

The shifts are ``torch.nn.utils.parametrize`` parametrizations, so every layer keeps its
class and forward, and attention processors and samplers work unchanged.

Artifact: ``spectral_shifts.safetensors``, ``{"unet.<layer>.weight": δ, "text_encoder.<layer>.weight": δ}``
(SD-XL: also ``text_encoder_2.<layer>.weight``; ``unet`` is the denoiser, PixArt-α's transformer too).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from lightning_modules.base import _DTYPES, PersonalizationModule

SHIFTS_FILE = "spectral_shifts.safetensors"
_MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm)


class SpectralShift(nn.Module):
    """Parametrization W -> U·diag(relu(σ + δ))·Vᵀ with trainable δ (initialised to 0).

    The SVD runs in fp32; U and Vᵀ are then kept in ``factor_dtype`` (the method's
    ``frozen_dtype``: bf16 halves them), while σ and δ stay fp32, so relu(σ + δ) − σ
    is computed in fp32 and only the product with U, Vᵀ runs in their dtype. With
    fp32 factors (the default) nothing is cast and results are unchanged."""

    keep_fp32_buffers = ("S",)  # cast_frozen_tensors leaves σ in fp32

    def __init__(self, weight: torch.Tensor, svd_device: torch.device | str | None = None,
                 factor_dtype: torch.dtype = torch.float32):
        super().__init__()
        w = weight.detach().to(svd_device or weight.device, torch.float32)
        matrix = w[None] if w.ndim == 1 else w.reshape(w.shape[0], -1)  # (m, n)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # (m, r), (r,), (r, n)
        self.register_buffer("U", u.to(weight.device, factor_dtype), persistent=False)
        self.register_buffer("S", s.to(weight.device), persistent=False)
        self.register_buffer("Vh", vh.to(weight.device, factor_dtype), persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(self.S))  # (r,)
        self.is_vector = weight.ndim == 1

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        shift = F.relu(self.S + self.delta) - self.S  # (r,): relu(σ + δ) − σ, zero at δ = 0, fp32
        update = (self.U * shift.to(self.U.dtype)) @ self.Vh  # (m, n) = U·diag(shift)·Vᵀ
        return weight + update.reshape(weight.shape).to(weight.dtype)

    def reconstruct(self) -> torch.Tensor:
        """U·diag(relu(σ + δ))·Vᵀ as a (m, n) matrix: eq. 1 written out, for checks."""
        return (self.U * F.relu(self.S + self.delta)) @ self.Vh


def add_spectral_shifts(module: nn.Module, include_norms: bool = True, include_embeddings: bool = True,
                        svd_device: torch.device | str | None = None,
                        factor_dtype: torch.dtype = torch.float32) -> dict[str, SpectralShift]:
    """Parametrize the weights of ``module``'s Linear/Conv (and norm, embedding) layers.

    Returns ``{"<layer>.weight": SpectralShift}``.
    """
    kinds = _MATRIX_LAYERS + (_NORM_LAYERS if include_norms else ()) + ((nn.Embedding,) if include_embeddings else ())
    shifts = {}
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, kinds) or getattr(layer, "weight", None) is None:
            continue
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"{name}.weight is already parametrized; add spectral shifts once.")
        shift = SpectralShift(layer.weight, svd_device, factor_dtype)
        parametrize.register_parametrization(layer, "weight", shift)
        shifts[f"{name}.weight"] = shift
    return shifts


class SVDiff(PersonalizationModule):
    """SVDiff: spectral shifts of the UNet's (and text encoder's) weights.

    Args:
        train_text_encoder: also shift the text encoder's weights (the study: all
            text-encoder and UNet layers).
        include_norms: shift the 1-d weights of LayerNorm/GroupNorm layers too.
        include_embeddings: shift the text encoder's token and position embeddings too.
        learning_rate_1d: learning rate of the 1-d (norm) shifts.
        svd_device: where to run the one-off SVDs (default: CUDA when available);
            U, σ, V then live with the module. With ``frozen_dtype`` bf16 the frozen
            weights and U, Vᵀ are bf16 (half of SVDiff's memory: the factors are as
            large as the weights again), σ and the trained shifts δ fp32.
        **kwargs: see :class:`~lightning_modules.base.PersonalizationModule`.
    """

    default_learning_rate = 1e-3  # SVDiff, SD2-base (sampling study, appendix B)
    casts_partly_trained = True  # W, U, Vᵀ in frozen_dtype; σ and the shifts δ stay fp32
    runtime_args = ("svd_device",)

    def __init__(self, *args, train_text_encoder: bool = True, include_norms: bool = True,
                 include_embeddings: bool = True, learning_rate_1d: float = 1e-6,
                 svd_device: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)

    def configure_trainable(self) -> None:
        from lightning_modules.dreambooth import check_text_trainable

        check_text_trainable(self, self.hparams.train_text_encoder)
        modules = {"unet": self.unet}
        if self.hparams.train_text_encoder:
            modules.update(self.text_encoders())  # SD-XL: both encoders
        self._shift_names: dict[str, SpectralShift] = {}  # "unet.<layer>.weight" -> its shift
        svd_device = self.hparams.svd_device or ("cuda" if torch.cuda.is_available() else "cpu")
        factor_dtype = _DTYPES[self.hparams.frozen_dtype]  # U, Vᵀ stored in it at once (host memory too)
        for prefix, module in modules.items():
            shifts = add_spectral_shifts(module, self.hparams.include_norms, self.hparams.include_embeddings, svd_device,
                                         factor_dtype)
            self._shift_names.update({f"{prefix}.{k}": v for k, v in shifts.items()})

    def spectral_shifts(self) -> dict[str, SpectralShift]:
        """``{"unet.<layer>.weight": SpectralShift}`` of every shifted weight."""
        return self._shift_names

    def parameter_groups(self) -> list[dict]:
        shifts = self.spectral_shifts().values()
        return [
            {"params": [s.delta for s in shifts if not s.is_vector]},
            {"params": [s.delta for s in shifts if s.is_vector], "lr": self.hparams.learning_rate_1d},
        ]

    def save_artifact_files(self, folder: Path) -> None:
        deltas = {k: s.delta.detach().float().cpu().contiguous() for k, s in self.spectral_shifts().items()}
        save_file(deltas, str(folder / SHIFTS_FILE))

    def load_artifact_files(self, folder: Path) -> None:
        deltas = load_file(str(folder / SHIFTS_FILE))
        shifts = self.spectral_shifts()
        missing, unexpected = sorted(set(shifts) - set(deltas)), sorted(set(deltas) - set(shifts))
        if missing or unexpected:
            raise KeyError(
                f"{folder / SHIFTS_FILE} does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}. "
                "Rebuild with the artifact's init args (train_text_encoder, include_norms, include_embeddings) "
                "on the base model it was trained on."
            )
        with torch.no_grad():
            for key, delta in deltas.items():
                shifts[key].delta.copy_(delta)
