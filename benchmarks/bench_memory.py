"""Training memory per method and backbone at the real model sizes.

    python benchmarks/bench_memory.py                       # estimate on the meta device (no weights, any machine)
    python benchmarks/bench_memory.py --device cuda         # measure one training step's peak on a GPU (random weights)

Estimate (``--device meta``, the default): each method is built exactly as training
builds it (its ``configure_model``), on components with the real architectures
(SD-XL base 1.0, PixArt-XL-2-512x512, SD2-base; configs below) on PyTorch's meta device,
so nothing is allocated or downloaded. Reported per method, in GiB:

- ``weights``: every parameter and buffer in the dtype the method leaves it in with
  ``frozen_dtype: bf16`` (counted, not assumed): frozen modules bf16; frozen weights of
  partly trained modules bf16 where the method allows it (LoRA/OFT/BOFT, SVDiff, whose
  U, Vᵀ are bf16 too and σ fp32), fp32 otherwise (DreamBooth q/k/v, Custom Diffusion);
  trainable parameters fp32;
- ``grads+adam``: fp32 gradients and AdamW's two moments of the trainable parameters;
- ``activations``: bytes autograd saves in one denoiser forward at batch 1 and the
  training resolution (bf16 compute, as ``bf16-mixed``), counted with
  ``torch.autograd.graph.saved_tensors_hooks`` on the meta device, without and with
  gradient checkpointing. With checkpointing this counts what stays saved outside the
  checkpointed blocks; the one block recomputed at a time during backward comes on top:
  ``largest block`` is the most one checkpointed block (UNet resnet, transformer block)
  saves without checkpointing, and ``total, ckpt + 2 x block`` adds it twice (its saved
  tensors again and their gradients). Text-encoder activations (77 or 120 tokens) and
  the allocator's fragmentation are not counted; latents are cached.

``--device cuda`` builds the same components with random weights on the GPU, runs one
``diffusion_loss`` + backward + AdamW step per method with bf16 autocast and reports
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.backbones import BACKBONES  # noqa: E402
from components.loader import SD2_BASE_CONFIG  # noqa: E402

#: stabilityai/stable-diffusion-xl-base-1.0 (its unet/text_encoder/text_encoder_2/vae config.json)
SDXL_BASE_CONFIG = {
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    "text_encoder_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"),
    "unet": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
    "vae": dict(SD2_BASE_CONFIG["vae"], sample_size=1024, scaling_factor=0.13025),
    "scheduler": SD2_BASE_CONFIG["scheduler"],
}
#: PixArt-alpha/PixArt-XL-2-512x512 (transformer config.json; text encoder: T5 v1.1 XXL's encoder)
PIXART_512_CONFIG = {
    "text_encoder": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                         relative_attention_num_buckets=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                         is_encoder_decoder=False),
    "transformer": dict(
        sample_size=64, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16, caption_channels=4096,
        in_channels=4, cross_attention_dim=1152, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ),
    "vae": SD2_BASE_CONFIG["vae"],
    "scheduler": BACKBONES["pixart-alpha"].tiny_config["scheduler"],
}
SD2_CONFIG = dict(SD2_BASE_CONFIG, text_encoder=dict(SD2_BASE_CONFIG["text_encoder"], vocab_size=49408))

#: backbone -> (backbone name, config, training resolution)
BACKBONE_SETUPS = {"sd2-base": ("sd", SD2_CONFIG, 512), "sdxl": ("sdxl", SDXL_BASE_CONFIG, 1024),
                   "pixart-512": ("pixart-alpha", PIXART_512_CONFIG, 512)}
#: method -> (class name, arguments); the study's settings (configs/methods)
METHODS = {
    "dreambooth": ("DreamBooth", {}),
    "dreambooth_qkv": ("DreamBoothQKV", {"train_text_encoder": True}),
    "textual_inversion": ("TextualInversion", {"placeholder": "<concept>"}),
    "custom_diffusion": ("CustomDiffusion", {"placeholder": "<new1>"}),
    "svdiff": ("SVDiff", {"train_text_encoder": True}),
    "lora": ("LoRA", {"rank": 4}),
}
#: what does not apply on PixArt-α (T5 frozen): the text-encoder parts switched off
PIXART_OVERRIDES = {"dreambooth_qkv": {"train_text_encoder": False}, "svdiff": {"train_text_encoder": False}}
GIB = 2 ** 30


def build_module(cls_name: str, kwargs: dict, components, gradient_checkpointing: bool):
    import lightning_modules
    import lightning_modules.base as base

    cls = getattr(lightning_modules, cls_name)
    if cls.unsupported_backbones.get(components.backbone.name):
        return None
    original = base.load_components
    base.load_components = lambda source: components  # the real-size components built by the caller
    try:
        module = cls(pretrained_model="bench", superclass="dog", frozen_dtype="bf16",
                     gradient_checkpointing=gradient_checkpointing, **kwargs)
        module.configure_model()
    finally:
        base.load_components = original
    return module


#: the units diffusers' gradient checkpointing recomputes (UNet resnets, transformer blocks)
CHECKPOINTED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")


def saved_activation_bytes(module, resolution: int) -> tuple[int, int]:
    """Bytes autograd saves in one denoiser forward (batch 1, bf16) on the meta device, and
    the most any one checkpointed block (:data:`CHECKPOINTED_BLOCKS`) saves of them: what
    its recomputation holds again during backward with gradient checkpointing."""
    c = module.components
    h = resolution // c.vae_scale_factor
    x = torch.empty(1, c.unet.config.in_channels, h, h, device="meta", dtype=torch.bfloat16)
    cond = _meta_condition(c, 1)
    total, per_block, active = 0, {}, []

    def pack(t):
        nonlocal total
        size = t.numel() * t.element_size()
        total += size
        if active:
            per_block[active[0]] = per_block.get(active[0], 0) + size  # the outermost block
        return t

    def enter(name):
        def hook(mod, args):
            active.append(name)  # returns None: the inputs stay as they are
        return hook

    def leave(mod, args, out):
        active.pop()  # returns None: the output stays as it is

    handles = []
    for name, m in module.unet.named_modules():
        if type(m).__name__ in CHECKPOINTED_BLOCKS:
            handles += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
    module.unet.to(torch.bfloat16)
    module.unet.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            c.predict(x.requires_grad_(), torch.tensor([500], device="meta"), cond)
    finally:
        for handle in handles:
            handle.remove()
    return total, max(per_block.values(), default=0)


def _meta_condition(c, batch: int):
    """A conditioning of the right shapes on the meta device (the text encoders stay out of it)."""
    from components.conditioning import Conditioning

    name = c.backbone.name
    meta = dict(device="meta", dtype=torch.bfloat16)
    if name == "sd":
        return torch.empty(batch, 77, c.unet.config.cross_attention_dim, **meta)
    if name == "sdxl":
        return Conditioning(torch.empty(batch, 77, c.unet.config.cross_attention_dim, **meta),
                            {"text_embeds": torch.empty(batch, c.text_encoder_2.config.projection_dim, **meta)})
    return Conditioning(torch.empty(batch, 120, c.unet.config.caption_channels, **meta),
                        {"encoder_attention_mask": torch.ones(batch, 120, device="meta", dtype=torch.long)})


def estimate(backbone: str, methods: list[str]) -> list[dict]:
    name, config, resolution = BACKBONE_SETUPS[backbone]
    rows = []
    for method in methods:
        cls_name, kwargs = METHODS[method]
        if name == "pixart-alpha":
            kwargs = {**kwargs, **PIXART_OVERRIDES.get(method, {})}
        if cls_name == "SVDiff":
            kwargs = {**kwargs, "svd_device": "meta"}  # the decomposition's shapes, no data
        row = {"backbone": backbone, "method": method, "resolution": resolution}
        for checkpointing in (False, True):
            with torch.device("meta"):
                components = BACKBONES[name]().build(config)
            module = build_module(cls_name, kwargs, components, checkpointing)
            if module is None:
                row["note"] = "does not apply"
                break
            if not checkpointing:
                params = list(module.parameters())
                trainable = sum(p.numel() for p in params if p.requires_grad)
                weights = sum(t.numel() * t.element_size() for t in [*params, *module.buffers()])
                row.update(trainable_params=trainable, weights=weights / GIB, grads_adam=trainable * 12 / GIB)
            saved, block = saved_activation_bytes(module, resolution)
            if checkpointing:
                row["activations_ckpt"] = saved / GIB
            else:
                row.update(activations=saved / GIB, largest_block=block / GIB)
        if "weights" in row and "activations_ckpt" in row:
            row["total_ckpt"] = row["weights"] + row["grads_adam"] + row["activations_ckpt"]
            # + one block recomputed during backward: its saved tensors again, and their gradients
            row["total_ckpt_block"] = row["total_ckpt"] + 2 * row["largest_block"]
        rows.append(row)
    return rows


def measure_cuda(backbone: str, methods: list[str]) -> list[dict]:
    """One training step per method on the GPU (random weights at the real size)."""
    name, config, resolution = BACKBONE_SETUPS[backbone]
    rows = []
    for method in methods:
        cls_name, kwargs = METHODS[method]
        if name == "pixart-alpha":
            kwargs = {**kwargs, **PIXART_OVERRIDES.get(method, {})}
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        components = BACKBONES[name]().build(config)
        module = build_module(cls_name, kwargs, components, gradient_checkpointing=True)
        if module is None:
            rows.append({"backbone": backbone, "method": method, "note": "does not apply"})
            continue
        module.to("cuda")
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
        batch = {"pixel_values": torch.rand(1, 3, resolution, resolution, device="cuda") * 2 - 1,
                 "cache_keys": ["bench"], "templates": ["a photo of {}"], "is_prior": torch.tensor([False]),
                 "masks": torch.ones(1, 1, resolution, resolution)}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.diffusion_loss(batch, torch.Generator("cuda").manual_seed(0))["loss"]
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        rows.append({"backbone": backbone, "method": method, "resolution": resolution,
                     "peak_gib": torch.cuda.max_memory_allocated() / GIB})
        del module, optimizer, components, loss
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["meta", "cuda"], default="meta")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONE_SETUPS), choices=list(BACKBONE_SETUPS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = estimate if args.device == "meta" else measure_cuda
    if args.device == "meta":
        print("| backbone | method | px | trainable params | weights GiB | grads+Adam GiB | activations GiB | "
              "activations, ckpt GiB | largest block GiB | total, ckpt GiB | total, ckpt + 2 x block GiB |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for backbone in args.backbones:
        for r in run(backbone, args.methods):
            if "note" in r:
                print(f"| {r['backbone']} | {r['method']} | | {r['note']} | | | | | | | |")
            elif args.device == "meta":
                print(f"| {r['backbone']} | {r['method']} | {r['resolution']} | {r['trainable_params'] / 1e6:.3f} M | "
                      f"{r['weights']:.2f} | {r['grads_adam']:.2f} | {r['activations']:.2f} | {r['activations_ckpt']:.2f} | "
                      f"{r['largest_block']:.2f} | {r['total_ckpt']:.2f} | {r['total_ckpt_block']:.2f} |", flush=True)
            else:
                print(r, flush=True)


if __name__ == "__main__":
    main()
