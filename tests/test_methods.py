"""Invariants of every fine-tuning method, on the tiny presets (CPU).

Parametrized over all methods on the SD preset, and over the methods that apply to
SD-XL and PixArt-α on theirs (tiny-sdxl, tiny-pixart): a training step runs; only the declared parameters
change; before training the model is the base model; the artifact holds only what
trained and reloads to the same outputs. Then the diffusers interop of the methods
that have a diffusers loader (LoRA, Custom Diffusion) and the method-specific checks
(SVDiff's decomposition, Custom Diffusion's start-token detach, peft's artifact layout).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from components.conditioning import Conditioning
from components.loader import load_components
from conftest import build, make, quiet_trainer, snapshot
from lightning_modules import (BOFT, OFT, CustomDiffusion, DreamBooth, DreamBoothQKV, HiFiTextualInversion, LoRA,
                               PersonalizationModule, SVDiff, TextualInversion, load_personalized)

METHODS = [
    pytest.param(DreamBooth, {}, id="dreambooth"),
    pytest.param(DreamBoothQKV, {}, id="dreambooth_qkv"),
    pytest.param(TextualInversion, {"placeholder": "<ball1>", "num_vectors": 2}, id="textual_inversion"),
    pytest.param(CustomDiffusion, {"placeholder": "<new1>"}, id="custom_diffusion"),
    pytest.param(CustomDiffusion, {"placeholder": "<new1>", "train_q_out": True}, id="custom_diffusion_q_out"),
    pytest.param(SVDiff, {}, id="svdiff"),
    pytest.param(LoRA, {"train_text_encoder": True, "text_rank": 2}, id="lora"),
    pytest.param(OFT, {"block_size": 8}, id="oft"),
    pytest.param(BOFT, {"num_blocks": 4, "train_text_encoder": True}, id="boft"),
    pytest.param(HiFiTextualInversion, {"global_steps": 1, "num_ddim_steps": 3, "steps_per_timestep": 1}, id="hifi"),
]
#: the methods on the other backbones (tiny presets), with the smallest settings that reach every code path
BACKBONE_METHODS = [
    pytest.param(DreamBooth, {"pretrained_model": "tiny-sdxl", "train_text_encoder": True}, id="sdxl-dreambooth"),
    pytest.param(DreamBoothQKV, {"pretrained_model": "tiny-sdxl"}, id="sdxl-dreambooth_qkv"),
    pytest.param(TextualInversion, {"pretrained_model": "tiny-sdxl", "placeholder": "<ball1>", "num_vectors": 2},
                 id="sdxl-textual_inversion"),
    pytest.param(CustomDiffusion, {"pretrained_model": "tiny-sdxl", "placeholder": "<new1>"}, id="sdxl-custom_diffusion"),
    pytest.param(SVDiff, {"pretrained_model": "tiny-sdxl"}, id="sdxl-svdiff"),
    pytest.param(LoRA, {"pretrained_model": "tiny-sdxl", "train_text_encoder": True, "text_rank": 2}, id="sdxl-lora"),
    pytest.param(DreamBooth, {"pretrained_model": "tiny-pixart"}, id="pixart-dreambooth"),
    pytest.param(DreamBoothQKV, {"pretrained_model": "tiny-pixart", "train_text_encoder": False}, id="pixart-dreambooth_qkv"),
    pytest.param(LoRA, {"pretrained_model": "tiny-pixart"}, id="pixart-lora"),
    pytest.param(SVDiff, {"pretrained_model": "tiny-pixart", "train_text_encoder": False}, id="pixart-svdiff"),
    pytest.param(CustomDiffusion, {"pretrained_model": "tiny-sdxl", "placeholder": "<new1>", "train_q_out": True},
                 id="sdxl-custom_diffusion_q_out"),
    pytest.param(BOFT, {"pretrained_model": "tiny-sdxl", "num_blocks": 4, "train_text_encoder": True}, id="sdxl-boft"),
    pytest.param(OFT, {"pretrained_model": "tiny-pixart", "block_size": 8}, id="pixart-oft"),
    pytest.param(HiFiTextualInversion, {"pretrained_model": "tiny-sdxl", "global_steps": 1, "num_ddim_steps": 3,
                                        "steps_per_timestep": 1}, id="sdxl-hifi"),
]
ALL_METHODS = METHODS + BACKBONE_METHODS


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)  # (B, C, h, w): tiny latents
    cond = torch.randn(2, 77, 32, generator=g)  # (B, L, D)
    return x, torch.tensor([999, 10]), cond


def same(a, b) -> bool:
    """Bit-identical conditionings (hidden states and extras) or tensors."""
    if isinstance(a, Conditioning):
        return (torch.equal(a.hidden_states, b.hidden_states) and a.extras.keys() == b.extras.keys()
                and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras))
    return torch.equal(a, b)


def perturb_trainable(module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable parameter, as training would (but more, and everywhere)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    if isinstance(module, HiFiTextualInversion):
        module.phases_started.fill_(module.num_ddim_steps)  # every step-wise embedding counts as trained


def timesteps_of(module) -> list[int | None]:
    return [int(t) for t in module.stepwise_timesteps] if getattr(module, "timestep_dependent", False) else [None]


# --------------------------------------------------------------------------- every method


@pytest.mark.parametrize("cls,kwargs", ALL_METHODS)
def test_training_step_changes_only_declared_parameters(cls, kwargs, demo_dm):
    module = make(cls, kwargs)
    trainable = module.trainable_state_keys() | set(module.extra_state_keys())
    before = snapshot(module)
    quiet_trainer(fast_dev_run=True).fit(module, demo_dm)
    after = snapshot(module)
    assert before.keys() == after.keys()
    frozen_changed = [k for k in before if k not in trainable and not torch.equal(before[k], after[k])]
    assert frozen_changed == [], f"frozen tensors changed: {frozen_changed[:5]}"
    assert any(not torch.equal(before[k], after[k]) for k in module.trainable_state_keys())


@pytest.mark.parametrize("cls,kwargs", ALL_METHODS)
def test_before_training_the_model_is_the_base_model(cls, kwargs):
    """Denoiser outputs and the conditioning of non-concept prompts equal the base model's,
    bit for bit (SVDiff: W + U·diag(relu(σ+0) − σ)·Vᵀ adds an exact zero; LoRA: B = 0;
    OFT/BOFT: R = I; Custom Diffusion: the original k/v weights)."""
    module = make(cls, kwargs).eval()
    base = load_components(module.hparams.pretrained_model)
    x, t, _ = unet_inputs()
    prompts = ["a photo of ball", ""]
    with torch.no_grad():
        expected = base.encode(prompts)
        assert torch.equal(module.components.predict(x, t, expected), base.predict(x, t, expected))
        for step in timesteps_of(module):
            assert same(module.encode_prompts(prompts, step), expected)


@pytest.mark.parametrize("cls,kwargs", ALL_METHODS)
def test_artifact_holds_only_what_trained_and_round_trips(cls, kwargs, tmp_path):
    module = make(cls, kwargs).eval()
    perturb_trainable(module)
    folder = module.save_artifact(tmp_path / "artifact")
    stored = sum(t.numel() for f in folder.rglob("*.safetensors") for t in load_file(str(f)).values() if t.is_floating_point())
    assert stored == module.num_trainable_parameters()

    loaded = load_personalized(artifact=folder)
    assert type(loaded) is cls and loaded.concept_phrase == module.concept_phrase
    # every argument the method declares (beyond the base's and runtime ones) is recorded and rebuilt
    own = {name for c in cls.__mro__[:cls.__mro__.index(PersonalizationModule)] if "__init__" in vars(c)
           for name, p in inspect.signature(c.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY}
    base = set(inspect.signature(PersonalizationModule.__init__).parameters)
    saved = module.artifact_init_args()
    assert set(saved) == own - base - set(cls.runtime_args) and saved
    assert json.loads(json.dumps(loaded.artifact_init_args())) == json.loads(json.dumps(saved))
    x, t, _ = unet_inputs()
    prompts = [f"a photo of {module.concept_phrase}", "a photo of ball", ""]
    with torch.no_grad():
        for step in timesteps_of(module):
            cond = module.encode_prompts(prompts, step)
            assert same(loaded.encode_prompts(prompts, step), cond)
            assert torch.equal(loaded.components.predict(x, t, cond[:2]), module.components.predict(x, t, cond[:2]))


# --------------------------------------------------------------------------- diffusers interop


def pipeline_images(pipe, prompt: str) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    return out.images  # (1, 3, 32, 32)


def test_lora_artifact_loads_with_diffusers_load_lora_weights(tmp_path):
    module = make(LoRA, {"train_text_encoder": True, "text_rank": 2, "alpha": 8}).eval()
    perturb_trainable(module, scale=0.2)
    folder = module.save_artifact(tmp_path / "lora")
    assert (folder / "pytorch_lora_weights.safetensors").exists()

    pipe = load_components("tiny").pipeline()
    pipe.load_lora_weights(folder)
    prompt = f"a photo of {module.concept_phrase}"
    with torch.no_grad():
        ours = pipeline_images(module.components.pipeline(), prompt)
        theirs = pipeline_images(pipe, prompt)
        base = pipeline_images(load_components("tiny").pipeline(), prompt)
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, base, atol=1e-3)  # the LoRA changed the image


def test_sdxl_lora_loads_with_load_lora_weights_and_ti_with_load_textual_inversion(tmp_path):
    """SD-XL artifacts in diffusers' own loaders: the LoRA (UNet + both text encoders)
    through StableDiffusionXLPipeline.load_lora_weights, the textual inversion (one
    vector set per encoder) through load_textual_inversion with clip_l / clip_g."""
    lora = make(LoRA, {"pretrained_model": "tiny-sdxl", "train_text_encoder": True, "text_rank": 2, "alpha": 8}).eval()
    perturb_trainable(lora, scale=0.2)
    pipe = load_components("tiny-sdxl").pipeline()
    pipe.load_lora_weights(lora.save_artifact(tmp_path / "lora"))
    assert {"unet", "text_encoder", "text_encoder_2"} <= set(pipe.get_list_adapters())
    prompt = f"a photo of {lora.concept_phrase}"
    with torch.no_grad():
        ours, theirs = pipeline_images(lora.components.pipeline(), prompt), pipeline_images(pipe, prompt)
        base = pipeline_images(load_components("tiny-sdxl").pipeline(), prompt)
    assert torch.equal(ours, theirs) and not torch.allclose(ours, base, atol=1e-3)

    ti = make(TextualInversion, {"pretrained_model": "tiny-sdxl", "placeholder": "<ball1>", "num_vectors": 2}).eval()
    perturb_trainable(ti, scale=0.5)
    state = load_file(str(ti.save_artifact(tmp_path / "ti") / "learned_embeds.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (2, 32), "clip_g": (2, 32)}
    pipe = load_components("tiny-sdxl").pipeline()
    pipe.load_textual_inversion(state["clip_l"], token="<ball1>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<ball1>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt = "a photo of <ball1>"  # diffusers writes out the vectors of a multi-vector token itself
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        cond = ti.encode_prompts([prompt])
        ours, theirs = pipeline_images(ti.components.pipeline(), prompt), pipeline_images(pipe, prompt)
    torch.testing.assert_close(cond.hidden_states, embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.extras["text_embeds"], pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_pixart_lora_artifact_is_diffusers_transformer_format(tmp_path):
    """No diffusers pipeline loads a PixArt-α LoRA (0.42); the artifact is the transformer
    LoRA format (``transformer.<module>.lora_A/B``) that peft loads into a plain transformer."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    module = make(LoRA, {"pretrained_model": "tiny-pixart", "rank": 2}).eval()
    perturb_trainable(module, scale=0.2)
    tensors = load_file(str(module.save_artifact(tmp_path / "lora") / "pytorch_lora_weights.safetensors"))
    assert tensors and all(k.startswith("transformer.") and ".lora_" in k for k in tensors)
    transformer = load_components("tiny-pixart").unet
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    inject_adapter_in_model(config, transformer)
    set_peft_model_state_dict(transformer, {k.removeprefix("transformer."): v for k, v in tensors.items()})
    with torch.no_grad():
        cond = module.encode_prompts(["a photo of sks ball"])
        x, t = torch.randn(1, 4, 8, 8), torch.tensor(500)
        ours = module.components.predict(x, t, cond)
        base = load_components("tiny-pixart")
        base.unet = transformer
        assert torch.equal(base.predict(x, t, cond), ours)


@pytest.mark.parametrize("cls,kwargs,message", [
    (HiFiTextualInversion, {"pretrained_model": "tiny-pixart"}, "does not apply to pixart-alpha models"),
    (SVDiff, {"pretrained_model": "tiny-pixart"}, "set train_text_encoder: false"),
    (LoRA, {"pretrained_model": "tiny-pixart", "train_text_encoder": True}, "set train_text_encoder: false"),
    (TextualInversion, {"pretrained_model": "tiny-pixart", "placeholder": "<b1>"}, "does not apply to pixart-alpha"),
    (CustomDiffusion, {"pretrained_model": "tiny-pixart", "placeholder": "<b1>"}, "does not apply to pixart-alpha"),
    (DreamBooth, {"pretrained_model": "tiny-pixart", "train_text_encoder": True}, "set train_text_encoder: false"),
])
def test_a_method_that_does_not_apply_to_a_backbone_says_so(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(cls, kwargs)


def test_custom_diffusion_artifact_loads_with_diffusers(tmp_path):
    from lightning_modules.custom_diffusion import WEIGHTS_FILE

    module = make(CustomDiffusion, {"placeholder": "<new1>", "train_q_out": True}).eval()
    perturb_trainable(module, scale=0.2)
    folder = module.save_artifact(tmp_path / "cd")

    pipe = load_components("tiny").pipeline()
    # _pipeline: diffusers 0.42 installs the loaded processors only then (huggingface/diffusers#9320)
    pipe.unet.load_attn_procs(folder, weight_name=WEIGHTS_FILE, _pipeline=pipe)
    pipe.load_textual_inversion(folder)
    kinds = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert kinds == {"CustomDiffusionAttnProcessor"}
    prompt = f"a photo of {module.concept_phrase}"
    with torch.no_grad():
        ours = pipeline_images(module.components.pipeline(), prompt)
        theirs = pipeline_images(pipe, prompt)
    # the processor attends with bmm instead of scaled_dot_product_attention: float32 rounding only
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- Custom Diffusion


def test_custom_diffusion_trains_cross_attention_and_the_modifier_token_only():
    kv = make(CustomDiffusion, {"placeholder": "<new1>"})
    assert kv.trainable_state_keys() == {k for k in kv.trainable_state_keys()
                                         if ".attn2.to_k." in k or ".attn2.to_v." in k or k.endswith("token_embedding.new")}
    assert any(k.endswith("token_embedding.new") for k in kv.trainable_state_keys())
    full = make(CustomDiffusion, {"placeholder": "<new1>", "train_q_out": True})
    assert all(".attn2." in k or k.endswith("token_embedding.new") for k in full.trainable_state_keys())
    assert any(".attn2.to_out.0.bias" in k for k in full.trainable_state_keys())


@pytest.mark.parametrize("detach", [True, False])
def test_custom_diffusion_start_token_key_value_get_no_gradient(detach):
    module = make(CustomDiffusion, {"placeholder": "<new1>", "detach_start_token": detach})
    x, t, _ = unet_inputs()
    cond = torch.zeros(2, 77, 32)
    cond[:, 0] = torch.randn(2, 32)  # only the start token carries anything
    module.unet(x, t, cond).sample.square().sum().backward()
    grads = [attn.to_k.weight.grad for attn in module.cross_attention_layers().values()]
    assert all(g is not None for g in grads)
    assert all((g.abs().max() == 0) == detach for g in grads)


# --------------------------------------------------------------------------- SVDiff


def test_svdiff_decomposition_reconstructs_the_weights():
    module = make(SVDiff, {})
    shifts = module.spectral_shifts()
    assert any(s.is_vector for s in shifts.values()) and any(k.startswith("text_encoder.") for k in shifts)
    for key, shift in shifts.items():
        layer = module.get_submodule(key.removesuffix(".weight"))
        original = layer.parametrizations.weight.original
        assert torch.equal(layer.weight, original)  # δ = 0: bit-identical
        # eq. 1 written out, U·diag(relu(σ))·Vᵀ, is W up to the SVD's rounding
        torch.testing.assert_close(shift.reconstruct().reshape(original.shape), original, atol=1e-5, rtol=1e-5)
    perturb_trainable(module, scale=0.5)
    for key, shift in shifts.items():
        layer = module.get_submodule(key.removesuffix(".weight"))
        torch.testing.assert_close(layer.weight.detach(), shift.reconstruct().reshape(layer.weight.shape).detach(),
                                   atol=1e-5, rtol=1e-5)


def test_svdiff_decomposes_once_and_checkpoints_only_the_shifts(demo_dm, monkeypatch):
    module = make(SVDiff, {"learning_rate_1d": 1e-6})

    def no_svd(*args, **kwargs):
        raise AssertionError("SVD recomputed during training")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(module, demo_dm)

    groups = module.trainer.optimizers[0].param_groups
    vectors = {id(s.delta) for s in module.spectral_shifts().values() if s.is_vector}
    assert [g["lr"] for g in groups] == [1e-2, 1e-6]  # lr, lr of the 1-d (norm) shifts
    assert {id(p) for p in groups[1]["params"]} == vectors and vectors
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.endswith(".delta") for k in checkpoint["state_dict"])
    assert not any(k.endswith((".U", ".S", ".Vh")) for k in module.state_dict())


def test_svdiff_frozen_factors_follow_frozen_dtype_and_the_shifts_stay_fp32():
    """frozen_dtype bf16: the frozen weights W and the factors U, Vᵀ are bf16 (SD-XL SVDiff
    fits 24 GB only so), σ and the trained shifts δ stay fp32 and the same shifts train;
    fp32 (the default) casts nothing and computes W + U·diag(relu(σ + δ) − σ)·Vᵀ as before."""
    fp32 = make(SVDiff, {"pretrained_model": "tiny-sdxl"})
    bf16 = make(SVDiff, {"pretrained_model": "tiny-sdxl", "frozen_dtype": "bf16"})
    assert bf16.num_trainable_parameters() == fp32.num_trainable_parameters() > 0
    assert bf16.trainable_state_keys() == fp32.trainable_state_keys()
    assert all(t.dtype == torch.float32 for t in [*fp32.parameters(), *fp32.buffers()] if t.is_floating_point())
    assert {p.dtype for p in bf16.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}
    for key, shift in bf16.spectral_shifts().items():
        ref = fp32.spectral_shifts()[key]
        original = bf16.get_submodule(key.removesuffix(".weight")).parametrizations.weight.original
        assert shift.U.dtype == shift.Vh.dtype == original.dtype == torch.bfloat16
        assert shift.S.dtype == shift.delta.dtype == torch.float32
        assert torch.equal(shift.U, ref.U.bfloat16()) and torch.equal(shift.Vh, ref.Vh.bfloat16())
        assert torch.equal(shift.S, ref.S)
    perturb_trainable(fp32, scale=0.5)
    with torch.no_grad():
        for key, shift in fp32.spectral_shifts().items():  # the fp32 formula, op for op
            layer = fp32.get_submodule(key.removesuffix(".weight"))
            W = layer.parametrizations.weight.original
            expected = W + ((shift.U * (F.relu(shift.S + shift.delta) - shift.S)) @ shift.Vh).reshape(W.shape)
            assert torch.equal(layer.weight, expected)
    # a bf16 training step without autocast: the loss reaches every fp32 shift the fp32 run reaches
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "cache_keys": ["a", "b"], "templates": ["a photo of {}"] * 2,
             "is_prior": torch.tensor([False, True]), "masks": torch.ones(2, 1, 32, 32)}
    for module in (fp32, bf16):
        module.diffusion_loss(batch, torch.Generator().manual_seed(0))["loss"].backward()
    reached = {n for n, p in fp32.named_parameters() if p.grad is not None}
    assert reached and reached == {n for n, p in bf16.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
                                   and p.grad.dtype == torch.float32}


def test_frozen_dtype_in_partly_trained_modules_only_where_the_method_casts():
    """LoRA's frozen base weights follow frozen_dtype (peft casts to the adapter's dtype and
    back), the adapters stay fp32; DreamBooth q/k/v keeps a partly trained UNet fp32."""
    lora = make(LoRA, {"pretrained_model": "tiny-sdxl", "frozen_dtype": "bf16"})
    assert lora.num_trainable_parameters() == make(LoRA, {"pretrained_model": "tiny-sdxl"}).num_trainable_parameters()
    assert {p.dtype for p in lora.unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}
    x, t, _ = unet_inputs()
    cond = lora.encode_prompts(["a photo of sks ball", ""])
    lora.components.predict(x.bfloat16(), t, cond.to(dtype=torch.bfloat16)).float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.parameters() if p.requires_grad)
    qkv = make(DreamBoothQKV, {"frozen_dtype": "bf16"})
    assert {p.dtype for p in qkv.unet.parameters()} == {torch.float32} and qkv.vae.dtype == torch.bfloat16


def test_svdiff_options_choose_the_layers():
    lean = make(SVDiff, {"train_text_encoder": False, "include_norms": False})
    assert not any(s.is_vector for s in lean.spectral_shifts().values())
    assert all(k.startswith("unet.") for k in lean.spectral_shifts())


# --------------------------------------------------------------------------- OFT / BOFT


@pytest.mark.parametrize("cls,kwargs", [(OFT, {"block_size": 8}), (BOFT, {"num_blocks": 4, "train_text_encoder": True})])
def test_oft_artifact_is_in_peft_layout(cls, kwargs, tmp_path):
    from peft import PeftConfig

    module = make(cls, kwargs)
    folder = module.save_artifact(tmp_path / "oft")
    for part in ("unet", "text_encoder") if module.hparams.train_text_encoder else ("unet",):
        config = PeftConfig.from_pretrained(str(folder / part))
        assert config.peft_type.value == cls.__name__
        assert set(config.target_modules) == set(module.hparams[f"{'unet' if part == 'unet' else 'text'}_target_modules"])


def test_adapter_options_are_checked():
    with pytest.raises(ValueError, match="exactly one of block_size"):
        make(OFT, {"block_size": 8, "num_blocks": 4})
