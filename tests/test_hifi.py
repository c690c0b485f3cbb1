"""HiFi Tuner's textual inversion: where c_s goes, eq. 6's regularization, the masked
loss (eq. 5), Algorithm 1's step-wise phase inside one Lightning run, the step-wise
artifact used step by step by a sampler, and the ablation switches."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from components.loader import load_components
from components.personalized import encode_text
from conftest import build, quiet_trainer
from datamodules.concept import ConceptDataModule
from lightning_modules import HiFiTextualInversion, load_personalized
from lightning_modules.hifi_tuner import EMBEDDINGS_FILE


def make(**kwargs) -> HiFiTextualInversion:
    kw = dict(pretrained_model="tiny", placeholder="sks", superclass="ball", learning_rate=1e-2, global_steps=2,
              num_ddim_steps=3, steps_per_timestep=2)
    kw.update(kwargs)
    return build(HiFiTextualInversion, **kw)


def demo(batch_size: int = 2, **kwargs) -> ConceptDataModule:
    return ConceptDataModule(concept_dir="demo", resolution=32, batch_size=batch_size, **kwargs)


def test_c_s_fills_the_padding_of_concept_prompts_only():
    module = make(num_tokens=4)
    base = load_components("tiny")
    n = module.num_tokens
    with torch.no_grad():
        null = encode_text(base.tokenizer, base.text_encoder, [""])[0]
        assert torch.equal(module.null_tail, null[-n:])  # ϕ_s
        assert torch.equal(module.global_embedding, null[-n:])  # c_s starts at ϕ_s
        module.global_embedding.add_(1.0)
        got = module.encode_prompts(["a photo of sks ball", "a photo of ball", ""])  # (3, L, D)
        plain = encode_text(base.tokenizer, base.text_encoder, ["a photo of ball", "a photo of ball", ""])
    # [c, c_s]: the placeholder is dropped from the text, c_s replaces the last n vectors
    assert torch.equal(got[0, :-n], plain[0, :-n]) and torch.equal(got[0, -n:], module.global_embedding)
    assert torch.equal(got[1:], plain[1:])  # the superclass and the empty prompt are untouched


def test_on_sdxl_c_s_holds_one_vector_per_encoder_in_the_padding_rows():
    """SD-XL: c_s rows are [clip_l | clip_g] vectors started at both encoders' rows for ""
    (not the zeros the pipeline uses for guidance); the marked prompt's pooled embedding and
    its other rows are those of the text without the placeholder; step-wise rows per DDIM step."""
    module = make(pretrained_model="tiny-sdxl", num_tokens=3)
    base = load_components("tiny-sdxl")
    n, widths = module.num_tokens, [base.text_encoder.config.hidden_size, base.text_encoder_2.config.hidden_size]
    assert module.embeddings.shape == (1 + module.num_ddim_steps, n, sum(widths))
    with torch.no_grad():
        rows = []
        for tokenizer, encoder in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
            ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            rows.append(encoder(ids, output_hidden_states=True).hidden_states[-2][0, -n:])  # each encoder's ϕ_s
        assert torch.equal(module.null_tail, torch.cat(rows, dim=-1))
        assert module.null_tail.abs().amax() > 0 and not torch.equal(module.null_tail[0], module.null_tail[1])
        stepwise = module.embeddings[1:]
        stepwise.add_(torch.arange(1.0, module.num_ddim_steps + 1)[:, None, None])  # c_s^{t_k} = ϕ_s + k + 1
        module.phases_started.fill_(module.num_ddim_steps)
        prompts = ["a photo of sks ball", "a photo of ball", ""]
        plain = base.encode(["a photo of ball", "a photo of ball", ""])
        for k, t in enumerate(module.stepwise_timesteps.tolist()):
            got = module.encode_prompts(prompts, t)
            assert torch.equal(got.hidden_states[0, -n:], stepwise[k])  # c_s^{t_k} at t_k (rows differ per k)
            assert torch.equal(got.hidden_states[0, :-n], plain.hidden_states[0, :-n])
            assert torch.equal(got.hidden_states[1:], plain.hidden_states[1:])  # superclass and "" (zeros) untouched
            assert torch.equal(got.extras["text_embeds"], plain.extras["text_embeds"])
        assert plain.hidden_states[2].abs().max() == 0  # the pipeline's unconditional stays zeros


def test_large_reg_weight_pulls_c_s_to_the_null_text_embedding():
    def distance_after_training(reg_weight: float) -> tuple[float, float]:
        # plain SGD, so the pull of eq. 6 shows undistorted: c_s − ϕ_s shrinks by (1 − 2·lr·w_s) per step
        module = make(reg_weight=reg_weight, stepwise=False, global_steps=4, masked_loss=False,
                      optimizer=lambda params: torch.optim.SGD(params, lr=1e-2))
        with torch.no_grad():
            module.global_embedding.add_(0.05 * torch.randn(module.global_embedding.shape, generator=torch.Generator().manual_seed(0)))
        start = (module.global_embedding - module.null_tail).norm().item()
        quiet_trainer(max_steps=4, limit_val_batches=0).fit(module, demo())
        return start, (module.global_embedding - module.null_tail).norm().item()

    start, free = distance_after_training(0.0)
    _, pulled = distance_after_training(25.0)
    assert free > 0.9 * start  # without regularization c_s stays away from ϕ_s
    assert pulled < 0.1 * start  # (1 − 2·0.01·25)^4 = 1/16


def test_regularization_is_eq_6():
    module = make(reg_weight=0.3).train()
    with torch.no_grad():
        module.global_embedding.add_(0.1)
    expected = 0.3 * (0.1 ** 2) * module.global_embedding.numel()
    assert module.regularization_loss().item() == pytest.approx(expected, rel=1e-4)
    assert make(reg_weight=0.0).train().regularization_loss() == 0.0


def test_masked_loss_has_no_gradient_from_outside_the_mask():
    module = make().train()
    dm = demo(batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch["masks"] = torch.zeros_like(batch["masks"])
    batch["masks"][..., :, 16:] = 1.0  # subject = right half (32 px image -> latent columns 4..7)
    outputs = []

    def keep(module, inputs, out):
        out.retain_grad()
        outputs.append(out)

    module.unet.conv_out.register_forward_hook(keep)
    module.diffusion_loss(batch, torch.Generator().manual_seed(0))["loss"].backward()
    grad = outputs[-1].grad  # (B, 4, 8, 8): d loss / d ε̂
    assert grad[..., :4].abs().max() == 0  # outside the mask: no gradient at all
    assert grad[..., 4:].abs().min() > 0
    assert module.embeddings.grad[0].abs().max() > 0  # c_s (row 0) trains in the global phase


def test_mask_guidance_without_masks_is_a_clear_error(tmp_path):
    from datamodules.synthetic import write_demo_concept

    folder = write_demo_concept(tmp_path / "no_masks", num_images=2, size=32)
    for mask in folder.glob("*_mask.png"):
        mask.unlink()
    dm = ConceptDataModule(concept_dir=str(folder), superclass="ball", resolution=32)
    with pytest.raises(ValueError, match="HiFi Tuner's mask guidance needs subject masks"):
        quiet_trainer(fast_dev_run=True).fit(make(), dm)
    quiet_trainer(fast_dev_run=True).fit(make(masked_loss=False), dm)  # mask guidance off: trains


class Recorder(L.Callback):
    """Per optimizer step: the UNet's timesteps and every embedding before the update."""

    def __init__(self):
        self.timesteps, self.before = [], []

    def on_fit_start(self, trainer, module):
        module.unet.register_forward_pre_hook(lambda m, args: self.timesteps.append(args[1].tolist()))

    def on_before_backward(self, trainer, module, loss):
        self.before.append([module.global_embedding.detach().clone()]
                           + [e.detach().clone() for e in module.stepwise_embeddings])


def test_algorithm_1_runs_inside_one_lightning_fit(tmp_path):
    module = make()
    recorder = Recorder()
    quiet_trainer(max_steps=module.total_steps, limit_val_batches=0, callbacks=[recorder]).fit(module, demo())
    assert module.total_steps == 2 + 3 * 2
    ddim = module.stepwise_timesteps.tolist()
    assert ddim == sorted(ddim, reverse=True)  # T first
    final = [module.global_embedding.detach()] + [e.detach() for e in module.stepwise_embeddings]
    for step, (timesteps, before) in enumerate(zip(recorder.timesteps, recorder.before)):
        k = module.phase(step)
        if k < 0:
            continue
        assert set(timesteps) == {ddim[k]}  # only the k-th DDIM timestep
        if (step - module.global_steps) % module.steps_per_timestep == 0:
            assert torch.equal(before[k + 1], final[k])  # c_s^t starts from c_s^{t+1} (c_s for the first)
    # an optimizer step changes the row it trains and no other (one parameter holds them all)
    after = recorder.before[1:] + [final]
    for step, (before, later) in enumerate(zip(recorder.before, after)):
        row = module.phase(step) + 1
        started = module.phase(step + 1) + 1 if module.phase(step + 1) != module.phase(step) else None
        assert not torch.equal(before[row], later[row]), step
        assert all(torch.equal(before[j], later[j]) for j in range(len(before)) if j not in (row, started)), step
    # every step-wise embedding trained, each differently
    assert all(not torch.equal(final[k], final[k + 1]) for k in range(len(final) - 1))

    folder = module.save_artifact(tmp_path / "hifi")
    state = load_file(str(folder / EMBEDDINGS_FILE))
    assert state["global"].shape == (5, 32) and state["stepwise"].shape == (3, 5, 32)
    assert state["timesteps"].tolist() == ddim
    assert torch.equal(state["stepwise"], torch.stack(final[1:]))


def test_a_sampler_uses_the_step_wise_embeddings_in_turn(tmp_path):
    from samplers import build_sampler

    module = make()
    quiet_trainer(max_steps=module.total_steps, limit_val_batches=0).fit(module, demo())
    model = load_personalized(artifact=module.save_artifact(tmp_path / "hifi"))
    assert model.timestep_dependent
    stored = load_file(str(tmp_path / "hifi" / EMBEDDINGS_FILE))

    calls, encode = [], model.encode_prompts
    def spy(prompts, timestep=None):
        out = encode(prompts, timestep)
        calls.append((list(prompts), timestep, out))
        return out
    model.encode_prompts = spy
    build_sampler("concept", num_steps=3).sample(model, ["a {} on the beach"], num_images=1, seed=0)

    concept = [(t, out) for prompts, t, out in calls if "sks" in prompts[0]]
    assert [t for t, _ in concept] == stored["timesteps"].tolist()  # one switch per DDIM step, T first
    for k, (_, out) in enumerate(concept):
        assert torch.equal(out[0, -5:], stored["stepwise"][k])
    empty = [out for prompts, _, out in calls if prompts == [""]]
    assert empty and all(torch.equal(e, empty[0]) for e in empty)  # the null text never gets c_s


def test_resume_mid_algorithm_matches_an_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = make()
    quiet_trainer(max_steps=full.total_steps, limit_val_batches=0).fit(full, demo())

    first = make()  # stops mid-phase (phase 0 began at step 2) at an epoch boundary (3 batches of 2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    quiet_trainer(max_steps=3, limit_val_batches=0, enable_checkpointing=True, callbacks=[ckpt]).fit(first, demo())
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert "phases_started" in state and not any("text_encoder" in k or "unet" in k for k in state)

    resumed = make()
    quiet_trainer(max_steps=resumed.total_steps, limit_val_batches=0).fit(resumed, demo(), ckpt_path=tmp_path / "last.ckpt")
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_switches_of_the_ablation(tmp_path):
    plain = make(stepwise=False, reg_weight=0.0, masked_loss=False)
    assert not plain.timestep_dependent and plain.total_steps == 2
    assert plain.train().regularization_loss() == 0.0
    folder = plain.save_artifact(tmp_path / "global")
    assert set(load_file(str(folder / EMBEDDINGS_FILE))) == {"global"}
    with pytest.raises(ValueError, match="set trainer.max_steps: 8"):
        quiet_trainer(max_steps=20).fit(make(), demo())
