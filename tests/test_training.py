"""Foundation methods: DreamBooth (full, q/k/v) and Textual Inversion on the tiny preset."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline

from conftest import build, make, quiet_trainer, snapshot
from lightning_modules import DreamBooth, DreamBoothQKV, TextualInversion, load_personalized
from lightning_modules.dreambooth import is_qkv

FOUNDATION = [
    (DreamBooth, {}),
    (DreamBooth, {"train_text_encoder": True}),
    (DreamBoothQKV, {}),
    (TextualInversion, {"placeholder": "<ball1>", "num_vectors": 2}),
]
IDS = ["dreambooth", "dreambooth+te", "dreambooth_qkv", "textual_inversion"]


@pytest.mark.parametrize("cls,kwargs", FOUNDATION, ids=IDS)
def test_fast_dev_run(cls, kwargs, demo_dm):
    module = make(cls, kwargs)
    quiet_trainer(fast_dev_run=True).fit(module, demo_dm)


def test_textual_inversion_changes_only_the_new_token(demo_dm):
    module = make(TextualInversion, {"placeholder": "<ball1>", "num_vectors": 2})
    before = snapshot(module)
    quiet_trainer(max_steps=3).fit(module, demo_dm)
    after = snapshot(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"text_encoder.embeddings.token_embedding.new"}
    # every original embedding row is bit-identical, the new rows moved
    table = module.text_encoder.get_input_embeddings()
    assert torch.equal(table.base.weight, before["text_encoder.embeddings.token_embedding.base.weight"])
    assert table.num_embeddings == table.num_base + 2


def test_dreambooth_qkv_changes_only_qkv(demo_dm):
    module = make(DreamBoothQKV, {})
    before = snapshot(module)
    quiet_trainer(max_steps=2).fit(module, demo_dm)
    after = snapshot(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_qkv(k) for k in changed)
    assert any(k.startswith("unet.") for k in changed) and any(k.startswith("text_encoder.") for k in changed)
    untouched_qkv = {k for k in before if is_qkv(k) and k.startswith(("unet.", "text_encoder.")) and k not in changed}
    assert not untouched_qkv


@pytest.mark.parametrize("cls,kwargs", FOUNDATION, ids=IDS)
def test_artifact_round_trip(cls, kwargs, demo_dm, tmp_path):
    module = make(cls, kwargs)
    quiet_trainer(max_steps=2).fit(module, demo_dm)
    module.eval()
    module.save_artifact(tmp_path / "artifact")
    loaded = load_personalized(None, tmp_path / "artifact")
    assert type(loaded) is cls and loaded.concept_phrase == module.concept_phrase
    prompt = f"a photo of {module.concept_phrase} on the beach"
    emb, emb2 = module.encode_prompts([prompt]), loaded.encode_prompts([prompt])
    torch.testing.assert_close(emb2, emb, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, t, emb2).sample, module.unet(x, t, emb).sample, rtol=0, atol=0)


def test_textual_inversion_artifact_loads_in_diffusers(demo_dm, tmp_path, tiny_folder):
    module = make(TextualInversion, {"placeholder": "<ball1>", "num_vectors": 2})
    quiet_trainer(max_steps=2).fit(module, demo_dm)
    module.eval().save_artifact(tmp_path / "ti")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder)
    pipe.load_textual_inversion(tmp_path / "ti")
    prompt = "a photo of <ball1> on the beach"
    # the pipeline expands multi-vector tokens itself, as our module does
    emb_pipe, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    torch.testing.assert_close(emb_pipe, module.encode_prompts([prompt]), rtol=0, atol=1e-6)


def test_dreambooth_artifact_loads_in_diffusers(demo_dm, tmp_path, tiny_folder):
    from diffusers import UNet2DConditionModel

    module = make(DreamBooth, {})
    quiet_trainer(max_steps=2).fit(module, demo_dm)
    module.save_artifact(tmp_path / "db")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "db", subfolder="unet")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, unet=unet)
    ref = module.unet.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in pipe.unet.state_dict().items())


def test_checkpoint_holds_only_trained_parameters(demo_dm, tmp_path):
    module = make(TextualInversion, {"placeholder": "<ball1>"})
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, demo_dm)
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == {"text_encoder.embeddings.token_embedding.new"}


def test_resume_continues_exactly(demo_dm, tmp_path):
    """2 epochs straight == 1 epoch, checkpoint, resume for the 2nd (same step, weights, optimizer)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_epochs, ckpt_path=None, root="a"):
        module = make(TextualInversion, {"placeholder": "<ball1>"}, seed=3)
        cb = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, save_top_k=-1, every_n_epochs=1)
        trainer = quiet_trainer(max_epochs=max_epochs, enable_checkpointing=True, callbacks=[cb])
        trainer.fit(module, copy.deepcopy(demo_dm), ckpt_path=ckpt_path)
        return module, trainer

    straight, t1 = run(2, root="straight")
    run(1, root="first")
    resumed, t2 = run(2, ckpt_path=str(tmp_path / "first" / "last.ckpt"), root="second")
    assert t1.global_step == t2.global_step == 2 * demo_dm.steps_per_epoch
    for (k, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), k
    s1, s2 = t1.optimizers[0].state_dict()["state"], t2.optimizers[0].state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) and torch.equal(s1[k]["step"], s2[k]["step"])


def test_v_prediction_trains(demo_dm):
    module = make(DreamBooth, {}, pretrained_model="tiny-v")
    assert module.noise_scheduler.config.prediction_type == "v_prediction"
    quiet_trainer(max_steps=1).fit(module, demo_dm)


@pytest.mark.parametrize("dilation, rows", [(0, 4), (3, 5), (4, 5), (5, 6)])
def test_masked_loss_has_no_gradient_outside_the_mask(demo_dm, dilation, rows):
    """‖M⊙(ε̂−ε)‖²: UNet predictions outside the subject mask get exactly zero gradient. The
    mask is the top 16 px rows of the 32 px image (latent rows 0..3 of 8); mask_dilation d
    grows it to 16 + d rows, so latent rows (4 px each) 0 .. ceil((16 + d) / 4) − 1 get
    gradient (partly covered rows too) and the rest none."""
    demo_dm.setup("fit")
    batch = next(iter(demo_dm.train_dataloader()))
    batch["masks"] = torch.zeros_like(batch["masks"])
    batch["masks"][..., :16, :] = 1.0
    module = make(DreamBooth, {}, masked_loss=True, mask_dilation=dilation)
    captured = {}

    def keep_prediction(mod, args, out):
        out.sample.retain_grad()
        captured["pred"] = out.sample

    handle = module.unet.register_forward_hook(keep_prediction)
    module.diffusion_loss(batch, module._generator("x"))["loss"].backward()
    handle.remove()
    grad = captured["pred"].grad  # (B, 4, 8, 8)
    assert grad[..., rows:, :].abs().max() == 0
    assert grad[..., :rows, :].abs().min() > 0


def test_gradient_checkpointing_gives_the_same_gradients(demo_dm):
    demo_dm.setup("fit")
    batch = next(iter(demo_dm.train_dataloader()))
    grads = []
    for ckpt in (False, True):
        module = make(DreamBooth, {"train_text_encoder": True}, gradient_checkpointing=ckpt)
        module.train()
        module.diffusion_loss(batch, module._generator("g"))["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)


def test_bf16_mixed_keeps_trainable_parameters_fp32(demo_dm):
    module = make(TextualInversion, {"placeholder": "<ball1>"}, frozen_dtype="bf16")
    assert module.unet.dtype == module.vae.dtype == torch.bfloat16
    before = module.token_embedding.new.detach().clone()
    quiet_trainer(max_steps=2, precision="bf16-mixed").fit(module, demo_dm)
    assert module.token_embedding.new.dtype == torch.float32
    assert not torch.equal(module.token_embedding.new, before)
    assert torch.isfinite(module.token_embedding.new).all()


def test_multi_vector_placeholder_expansion_is_idempotent():
    from lightning_modules.tokens import expand_placeholder

    once = expand_placeholder("a <p> and a <p> dog", "<p>", 3)
    assert once == "a <p> <p>_1 <p>_2 and a <p> <p>_1 <p>_2 dog"
    assert expand_placeholder(once, "<p>", 3) == once
    module = make(TextualInversion, {"placeholder": "<ball1>", "num_vectors": 3})
    assert module.concept_phrase == "<ball1> <ball1>_1 <ball1>_2"
    ids = module.tokenizer(module.concept_phrase, add_special_tokens=False).input_ids
    assert ids == module.tokenizer.convert_tokens_to_ids(["<ball1>", "<ball1>_1", "<ball1>_2"])


def test_repeated_prompts_encoded_once_same_loss_and_gradient(demo_dm):
    """A trained text side encodes each distinct prompt of a batch once: the loss and the
    new token's gradient equal those of encoding every row on its own."""
    module = make(TextualInversion, {"placeholder": "<ball1>", "num_vectors": 2})
    prompts = ["a photo of <ball1>", "a photo of <ball1>", "a <ball1> on the beach", "a photo of <ball1>"]
    timesteps = torch.tensor([10, 500, 900, 300])
    calls = []
    encode = module.encode_prompts
    module.encode_prompts = lambda ps, t=None: calls.append(list(ps)) or encode(ps, t)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def loss_and_grad(cond):
        pred = module.components.predict(latents, timesteps, cond)
        loss = pred.square().mean()
        (grad,) = torch.autograd.grad(loss, module.token_embedding.new)
        return loss.detach(), grad

    deduped = loss_and_grad(module.encode_training_prompts(prompts, timesteps))
    assert calls == [["a photo of <ball1>", "a <ball1> on the beach"]]
    row_by_row = loss_and_grad(torch.cat([encode([p]) for p in prompts]))
    torch.testing.assert_close(deduped[0], row_by_row[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(deduped[1], row_by_row[1], rtol=1e-5, atol=1e-8)
    assert deduped[1].abs().sum() > 0


def test_default_optimizer_is_fused_adamw_with_the_plain_update(demo_dm):
    """The default AdamW runs fused (one kernel over all tensors) on CPU/CUDA parameters
    and makes the same update as torch's per-tensor AdamW."""
    module = make(DreamBoothQKV, {})
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    params = [p for g in opt.param_groups for p in g["params"]]
    reference = [p.detach().clone().requires_grad_() for p in params]
    plain = torch.optim.AdamW(reference, lr=opt.defaults["lr"], weight_decay=opt.defaults["weight_decay"],
                              foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, reference):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        plain.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)


def test_components_built_on_the_cpu_under_another_default_device():
    """configure_model builds on the CPU in fp32 whatever the ambient default device (a
    Trainer's init context on an accelerator; "meta" stands in for it here) and, with none
    set, adds no device context of its own: the weights are the same either way."""
    from lightning_modules import LoRA

    plain = make(LoRA, rank=2)
    assert torch.get_default_device().type == "cpu"
    with torch.device("meta"):
        module = LoRA(pretrained_model="tiny", placeholder="sks", superclass="ball", learning_rate=1e-2, rank=2)
        module.configure_model()
        assert torch.get_default_device().type == "meta"  # restored after configure_model
    params = dict(module.named_parameters())
    assert {p.device.type for p in params.values()} == {"cpu"}
    assert {p.dtype for p in params.values()} == {torch.float32}
    for name, p in plain.named_parameters():
        if not p.requires_grad:  # the loaded base weights (adapters start from the seeded init)
            assert torch.equal(p, params[name]), name


def test_ema_averages_trained_weights_and_resumes_exactly(demo_dm, tmp_path):
    """callbacks.EMA: after fit the module holds the exponential average of its trained
    weights (computed here by hand from every step's weights); checkpoints keep only what
    trains; 2 epochs straight == 1 epoch, checkpoint, resume (the average and the weights)."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from callbacks import EMA

    decay = 0.5

    class Record(Callback):  # the trained weights after every optimizer step
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.steps.append({k: p.detach().clone() for k, p in pl_module.named_parameters() if p.requires_grad})

    def run(max_epochs, ckpt_path=None, root="a", record=None):
        module = make(DreamBooth, {}, seed=3)
        cb = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, save_top_k=-1, every_n_epochs=1)
        extra = [record] if record is not None else []
        trainer = quiet_trainer(max_epochs=max_epochs, enable_checkpointing=True,
                                callbacks=[*extra, EMA(decay=decay), cb])
        trainer.fit(module, copy.deepcopy(demo_dm), ckpt_path=ckpt_path)
        return module, trainer

    record = Record()
    straight, _ = run(2, root="straight", record=record)
    assert len(record.steps) == 2 * demo_dm.steps_per_epoch >= 2
    expected = dict(record.steps[0])  # torch's EMA: the first update copies, then lerp by 1 - decay
    for weights in record.steps[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * w for k, w in weights.items()}
    for k, p in straight.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), expected[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(straight.unet.conv_in.weight, record.steps[-1]["unet.conv_in.weight"])  # not the last step's
    run(1, root="first")
    ckpt = torch.load(tmp_path / "first" / "last.ckpt", weights_only=False)
    trained = {k for k, p in straight.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == set(ckpt["current_model_state"]) == trained
    resumed, _ = run(2, ckpt_path=str(tmp_path / "first" / "last.ckpt"), root="second")
    for (k, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), k
