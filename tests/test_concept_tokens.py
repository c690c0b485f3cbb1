"""Where each method puts its concept in the conditioning (PersonalizedModel.prompt_tokens
and concept_token_positions), and that the attention samplers read it from the model,
not from the prompt string (issue 11: HiFi Tuner's c_s rows)."""

from __future__ import annotations

import pytest
import torch

from components.personalized import NO_TOKEN, BaseModel, PersonalizedModel, fill
from conftest import make
from lightning_modules import CustomDiffusion, DreamBooth, HiFiTextualInversion, TextualInversion
from samplers import build_sampler
from samplers.attention import align_prompts, concept_weights

TEMPLATE = "a red {} on the beach"


@pytest.fixture(scope="module")
def hifi():
    return make(HiFiTextualInversion, num_tokens=3, stepwise=False)


def hidden(cond):
    return getattr(cond, "hidden_states", cond)


def test_hifi_concept_rows_are_its_c_s_rows(hifi):
    prompt = fill(TEMPLATE, hifi.concept_phrase)  # "a red sks ball on the beach"
    positions = hifi.concept_token_positions(TEMPLATE)
    length = hidden(hifi.encode_prompts([prompt])).shape[1]
    assert positions == list(range(length - 3, length))
    with torch.no_grad():
        hifi.embeddings.normal_()  # c_s far from the null-text tail, so the rows are recognisable
        cond = hifi.encode_prompts([prompt])[0]
    torch.testing.assert_close(cond[positions], hifi.global_embedding.detach())
    # the rows the old string search pointed at hold text tokens: "ball" is where the superclass prompt has it
    tokens, superclass_tokens = hifi.prompt_tokens(prompt), hifi.prompt_tokens(fill(TEMPLATE, "ball"))
    assert tokens[-3:] == [NO_TOKEN] * 3 and NO_TOKEN not in superclass_tokens
    assert tokens[:-3] == superclass_tokens[:-3]  # the placeholder is not in the text the encoder reads
    weights = concept_weights(hifi, [TEMPLATE, "{}"])
    assert weights.shape == (2, length) and (weights[:, -3:] == 1 / 3).all() and weights[:, :-3].sum() == 0


def test_hifi_photoswap_aligns_text_rows_one_to_one(hifi):
    index, alpha = align_prompts(hifi, fill(TEMPLATE, "ball"), fill(TEMPLATE, hifi.concept_phrase))
    n = len(index)
    assert (alpha[: n - 3] == 1).all() and (alpha[n - 3:] == 0).all()  # c_s rows keep their own maps
    assert torch.equal(index[: n - 3], torch.arange(n - 3))  # no shift from the subject word on


def concept_tokens(model):
    prompt = fill(TEMPLATE, model.concept_phrase)
    ids = model.prompt_tokens(prompt)
    return prompt, ids, [ids[p] for p in model.concept_token_positions(TEMPLATE)]


def test_textual_inversion_multi_vector_positions_are_its_new_tokens():
    model = make(TextualInversion, placeholder="<ball1>", num_vectors=3)
    prompt, ids, found = concept_tokens(model)
    new = model.tokenizer.convert_tokens_to_ids(["<ball1>", "<ball1>_1", "<ball1>_2"])
    assert found == new and ids.index(new[0]) == 3  # <bos> a red | <ball1> <ball1>_1 <ball1>_2
    # the superclass prompt aligns with every text token; the 3 vectors have no counterpart
    index, alpha = align_prompts(model, fill(TEMPLATE, "ball"), prompt)
    assert alpha[3:6].tolist() == [0, 0, 0] and alpha[:3].all() and alpha[6:10].all()
    assert index[6] == 4  # "on": after "ball" in the superclass prompt, after the three vectors here


def test_custom_diffusion_position_is_its_modifier_token():
    model = make(CustomDiffusion, placeholder="<v1>")
    _, ids, found = concept_tokens(model)
    assert model.concept_phrase == "<v1> ball"
    assert found == model.tokenizer.convert_tokens_to_ids(["<v1>"]) and ids.index(found[0]) == 3


def test_dreambooth_position_is_its_identifier():
    model = make(DreamBooth)
    _, ids, found = concept_tokens(model)
    assert found == model.tokenizer("sks", add_special_tokens=False).input_ids
    assert model.concept_token_positions(TEMPLATE) == [3]


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-pixart"])
def test_positions_on_other_backbones(preset):
    from components.loader import load_components

    model = BaseModel(load_components(preset), superclass="ball")
    prompt = fill(TEMPLATE, model.concept_phrase)
    ids = model.prompt_tokens(prompt)
    assert len(ids) == hidden(model.encode_prompts([prompt])).shape[1]  # one id per conditioning row
    bos = 0 if preset == "tiny-pixart" else 1  # T5 has no start token
    assert model.concept_token_positions(TEMPLATE) == [bos + 2]
    assert ids[bos + 2] == model.components.tokenizer("sks", add_special_tokens=False).input_ids[0]


def test_masked_sampler_reads_the_models_rows(hifi, monkeypatch):
    import samplers.masked as masked

    seen = []

    class Recording(masked.ConceptMapStore):
        def __init__(self, weights, *args, **kwargs):
            seen.append(weights.clone())
            super().__init__(weights, *args, **kwargs)

    monkeypatch.setattr(masked, "ConceptMapStore", Recording)
    assert isinstance(hifi, PersonalizedModel)
    build_sampler("masked", num_steps=2, t_sw=1).sample(hifi, [TEMPLATE], num_images=1)
    assert seen and (seen[0][0, -3:] == 1 / 3).all() and seen[0][0, :-3].sum() == 0


@pytest.mark.parametrize("token_map", ["aligned", "photoswap", "positional"])
def test_photoswap_keeps_hifis_c_s_maps_its_own(hifi, monkeypatch, token_map):
    import samplers.photoswap as photoswap

    seen = []

    class Recording(photoswap.AttentionInjection):
        def __init__(self, n, source, target, index, alpha, **kwargs):
            seen.append((index.clone(), alpha.clone()))
            super().__init__(n, source, target, index, alpha, **kwargs)

    monkeypatch.setattr(photoswap, "AttentionInjection", Recording)
    build_sampler("photoswap", num_steps=2, t_sf=1, t_cm=1, t_sm=1, token_map=token_map).sample(hifi, [TEMPLATE], num_images=1)
    index, alpha = seen[0]
    n = alpha.shape[1]
    assert (alpha[0, n - 3:] == 0).all()  # c_s rows: their own maps
    if token_map != "positional":
        assert torch.equal(index[0, :7], torch.arange(7)) and alpha[0, :7].all()  # <bos> a red ball on the beach
