"""Tokenizer, tiny preset and the one component loader (the real loading path)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from components.loader import build_tiny_components, load_components
from components.tokenizer import build_tiny_tokenizer, read_words


def test_tokenizer_is_deterministic_and_keeps_words_whole(tmp_path):
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    words = read_words()
    split = [w for w in words if len(a(w, add_special_tokens=False).input_ids) != 1]
    assert split == []
    # unknown words still tokenize into byte pieces, never the unknown token
    ids = a("xyzzy qwv", add_special_tokens=False).input_ids
    assert len(ids) > 2 and a.unk_token_id not in ids
    a.save_pretrained(tmp_path)
    c = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a photo of sks dog on the beach, xyzzy!"
    assert c(text).input_ids == a(text).input_ids
    assert a(text).input_ids[0] == a.bos_token_id and a(text).input_ids[-1] == a.eos_token_id


def test_tiny_preset_is_a_diffusers_pipeline_folder(tiny_folder):
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder)
    c = load_components(tiny_folder)
    ref = build_tiny_components()
    # the saved-and-loaded weights are exactly the in-memory preset
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(c, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert all(torch.equal(getattr(pipe, name).state_dict()[k], want[k]) for k in want)
    assert c.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    assert c.resolution == 32 and c.prediction_type == "epsilon"


def test_prediction_type_comes_from_scheduler_config():
    assert load_components("tiny-v").prediction_type == "v_prediction"
    assert load_components("tiny").ddim_scheduler().config.set_alpha_to_one is False


@pytest.mark.parametrize("source", ["/no/such/folder", "./missing-model"])
def test_missing_model_folder_is_a_clear_error(source):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_components(source)


def test_folder_without_model_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_components(tmp_path)
