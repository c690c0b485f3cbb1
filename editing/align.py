"""HiFi Tuner's Algorithm 4 (Appendix B): the similarity transform T_θ that places the
reference subject (mask M_r) on the generated one (mask M_g), and warping with it.

T_θ = S(θ₁) · R(θ₂) · Tr(θ₃, θ₄) (eq. 8), acting on homogeneous point coordinates
(x, y, 1). P(M) are the coordinates of a mask's pixels. The objective is the paper's
point-set one: s(θ) = Σ_{p ∈ T_θ(P_r)} min_{q ∈ P_g} ‖p − q‖², minimised by gradient
steps (Adam here; the paper names only "η ∇_θ s"). It pulls every transformed reference
pixel into the generated mask (pixels already inside cost nothing), so the reference
subject is placed roughly where, and at roughly the size, the generated subject is.

Choices the paper leaves open (ours): coordinates normalised to [−1, 1] (pixel centres,
as ``torch.nn.functional.affine_grid`` with ``align_corners=False``) on masks resized to
at most ``max_side`` pixels a side; θ starts at the centroid match (θ₁ from the area
ratio, θ₂ = 0); L = 100 Adam steps, lr 0.02; a ``P`` of more than ``max_points`` pixels is
subsampled with a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def mask_points(mask: torch.Tensor) -> torch.Tensor:
    """P(M) without the homogeneous 1: (N, 2) (x, y) in [−1, 1] of the pixels where M is on."""
    m = mask.reshape(mask.shape[-2:]).bool()
    h, w = m.shape
    ys, xs = torch.nonzero(m, as_tuple=True)
    return torch.stack([(2 * xs.float() + 1) / w - 1, (2 * ys.float() + 1) / h - 1], dim=1)


def transform_matrix(theta: torch.Tensor) -> torch.Tensor:
    """Eq. 8: (3, 3) S(θ₁) R(θ₂) Tr(θ₃, θ₄)."""
    s, a, tx, ty = theta[0], theta[1], theta[2], theta[3]
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    scale = torch.stack([torch.stack([s, zero, zero]), torch.stack([zero, s, zero]), torch.stack([zero, zero, one])])
    rot = torch.stack([torch.stack([a.cos(), -a.sin(), zero]), torch.stack([a.sin(), a.cos(), zero]),
                       torch.stack([zero, zero, one])])
    trans = torch.stack([torch.stack([one, zero, tx]), torch.stack([zero, one, ty]), torch.stack([zero, zero, one])])
    return scale @ rot @ trans


def apply(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    homogeneous = torch.cat([points, torch.ones(points.shape[0], 1, dtype=points.dtype)], dim=1)  # (N, 3)
    return (homogeneous @ matrix.T)[:, :2]


def objective(matrix: torch.Tensor, p_r: torch.Tensor, p_g: torch.Tensor) -> torch.Tensor:
    """Algorithm 4's s: every transformed reference point's squared distance to its nearest generated point, summed."""
    p_t = apply(matrix, p_r)
    return torch.cdist(p_t, p_g).pow(2).min(dim=1).values.sum()


@dataclass
class Alignment:
    theta: torch.Tensor  # (4,) θ₁ scale, θ₂ rotation (rad), θ₃, θ₄ translation
    matrix: torch.Tensor  # (3, 3) T_θ*
    loss: float  # s at θ*
    initial_loss: float


def _resize_mask(mask: torch.Tensor, max_side: int) -> torch.Tensor:
    m = mask.reshape(1, 1, *mask.shape[-2:]).float()
    h, w = m.shape[-2:]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        m = F.interpolate(m, size=(max(1, round(h * f)), max(1, round(w * f))), mode="area")
    return m[0, 0] > 0.5


def optimize_transform(m_r: torch.Tensor, m_g: torch.Tensor, steps: int = 100, lr: float = 0.02,
                       max_side: int = 32, max_points: int = 1024, seed: int = 0) -> Alignment:
    """Algorithm 4: T_θ* aligning M_r to M_g (masks (H, W) or (1, H, W), any sizes)."""
    p_r, p_g = mask_points(_resize_mask(m_r, max_side)), mask_points(_resize_mask(m_g, max_side))
    if len(p_r) == 0 or len(p_g) == 0:
        eye = torch.eye(3)
        return Alignment(torch.tensor([1.0, 0.0, 0.0, 0.0]), eye, float("nan"), float("nan"))
    gen = torch.Generator().manual_seed(seed)
    if len(p_r) > max_points:
        p_r = p_r[torch.randperm(len(p_r), generator=gen)[:max_points]]
    if len(p_g) > max_points:
        p_g = p_g[torch.randperm(len(p_g), generator=gen)[:max_points]]
    scale = (len(mask_points(_resize_mask(m_g, max_side))) / len(mask_points(_resize_mask(m_r, max_side)))) ** 0.5
    c_r, c_g = p_r.mean(0), p_g.mean(0)
    t0 = c_g / scale - c_r  # S (c_r + t) = c_g
    theta = torch.tensor([scale, 0.0, float(t0[0]), float(t0[1])], requires_grad=True)
    initial = float(objective(transform_matrix(theta.detach()), p_r, p_g))
    optimizer = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            loss = objective(transform_matrix(theta), p_r, p_g)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    theta = theta.detach()
    matrix = transform_matrix(theta)
    return Alignment(theta, matrix, float(objective(matrix, p_r, p_g)), initial)


def warp(image: torch.Tensor, matrix: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """T_θ(I): (B, C, H, W) moved so that a pixel at p goes to T_θ p (output pixel q reads I at T_θ⁻¹ q)."""
    inverse = torch.linalg.inv(matrix.double()).float()[:2].to(image.device)  # (2, 3)
    grid = F.affine_grid(inverse.expand(image.shape[0], 2, 3), list(image.shape), align_corners=False)
    return F.grid_sample(image.float(), grid.to(image.device), mode=mode, padding_mode="border",
                         align_corners=False).to(image.dtype)


def warp_mask(mask: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """T_θ(M): (B, 1, H, W) bool; outside the reference frame is off."""
    m = mask.float()
    inverse = torch.linalg.inv(matrix.double()).float()[:2]
    grid = F.affine_grid(inverse.expand(m.shape[0], 2, 3), list(m.shape), align_corners=False)
    return F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5
