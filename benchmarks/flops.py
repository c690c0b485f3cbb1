"""Model FLOP utilisation (MFU) of the benchmarks: achieved UNet FLOP/s over the device's peak.

The UNet's FLOPs are counted, not estimated: one forward pass of one row under
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; a
multiply-add is 2 FLOPs), times the rows a benchmark pushed through the UNet. Training
counts forward + backward (3× forward, the usual rule for a step that back-propagates
through the whole UNet; a method that trains only the text side still back-propagates
through the UNet's activations). The peak is the dense tensor-core figure of the
device's datasheet for the dtype; ``--peak-tflops`` overrides it for an unlisted device.
"""

from __future__ import annotations

import torch

#: dense (no sparsity) peak TFLOP/s by device-name fragment and dtype
PEAK_TFLOPS = {
    "H100": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 494.5},  # SXM; fp32 = TF32 tensor cores
    "H200": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 494.5},
    "A100": {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 156.0},
    "L40S": {torch.bfloat16: 362.0, torch.float16: 362.0, torch.float32: 183.0},
    "A10G": {torch.bfloat16: 70.0, torch.float16: 70.0, torch.float32: 35.0},
}


@torch.no_grad()
def unet_flops_per_row(unet, tokens: int = 77) -> float:
    """FLOPs of one UNet forward for one row (one latent, a prompt of ``tokens``, one timestep)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
    p = next(unet.parameters())
    x = torch.zeros(1, cfg.in_channels, *size, device=p.device, dtype=p.dtype)
    context = torch.zeros(1, tokens, cfg.cross_attention_dim, device=p.device, dtype=p.dtype)
    t = torch.tensor([500], device=p.device)
    counter = FlopCounterMode(display=False)
    with counter:
        unet(x, t, encoder_hidden_states=context)
    return float(counter.get_total_flops())


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of a CUDA device for dtype (None when unknown or on CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table.get(dtype, table[torch.float32]) * 1e12
    return None


def mfu_line(flops: float, seconds: float, device: torch.device, dtype: torch.dtype,
             override_tflops: float | None = None) -> str:
    """'X TFLOP/s achieved, MFU Y% of the peak' (or why there is no MFU)."""
    achieved = flops / max(seconds, 1e-12)
    peak = peak_flops(device, dtype, override_tflops)
    if peak is None:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else device.type
        return f"{achieved / 1e12:.4f} TFLOP/s achieved (UNet, counted); no peak known for {where} (--peak-tflops)"
    return f"{achieved / 1e12:.2f} TFLOP/s achieved (UNet, counted), MFU {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s"
