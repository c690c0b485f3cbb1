"""CLIP-I, CLIP-T and DINO against direct computations with the same tiny backbones."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metrics import (
    CLIPImageSimilarity,
    CLIPTextSimilarity,
    ConceptMetrics,
    DINOSimilarity,
    ImagePreprocess,
    ReferenceCache,
    clip_t_text,
    load_clip_backbone,
    load_dino_backbone,
    tiny_backbone_folder,
)

DREAMBOOTH = Path(__file__).resolve().parents[2] / "shared" / "dreambooth"


@pytest.fixture(scope="module")
def clip():
    return load_clip_backbone(tiny_backbone_folder("clip"))


@pytest.fixture(scope="module")
def dino():
    return load_dino_backbone(tiny_backbone_folder("dino"))


def _uint8_images(n, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def _pil(images_u8):
    from PIL import Image

    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images_u8]


def _reference_processor(folder):
    """The transformers processor saved with the backbone (its PIL implementation here)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


def _direct_image_embeddings(folder, model_fn, images_u8):
    px = _reference_processor(folder)(images=_pil(images_u8), return_tensors="pt").pixel_values
    with torch.no_grad():
        return F.normalize(model_fn(px), dim=-1)


@pytest.mark.parametrize("kind", ["clip", "dino", "dinov2"])
def test_preprocessing_matches_transformers_processor(kind):
    """Resize (shortest edge or square), crop and normalize as the saved processor does."""
    folder = tiny_backbone_folder(kind)
    from transformers.image_processing_utils import ImageProcessingMixin

    pre = ImagePreprocess.from_config(ImageProcessingMixin.get_image_processor_dict(str(folder))[0])
    images = _uint8_images(3, h=45, w=61, seed=1)
    ours = pre(images.float() / 255)
    ref = _reference_processor(folder)(images=_pil(images), return_tensors="pt").pixel_values
    assert ours.shape == ref.shape
    # PIL resamples 8-bit images and rounds; torch resamples floats: allow a few grey levels
    assert (ours - ref).abs().mean() < 0.02
    # and without a resize both are exactly rescale + normalize
    if kind != "dinov2":
        exact = _uint8_images(2, seed=2)
        ref = _reference_processor(folder)(images=_pil(exact), return_tensors="pt").pixel_values
        torch.testing.assert_close(pre(exact.float() / 255), ref, atol=1e-5, rtol=0)


def test_clip_i_and_clip_t_equal_direct_computation(clip):
    folder = tiny_backbone_folder("clip")
    model = clip.model
    gen_u8, real_u8 = _uint8_images(6, seed=3), _uint8_images(4, seed=4)
    gen = _direct_image_embeddings(folder, lambda px: model.get_image_features(pixel_values=px).pooler_output, gen_u8)
    real = _direct_image_embeddings(folder, lambda px: model.get_image_features(pixel_values=px).pooler_output, real_u8)
    expected_i = (gen @ real.T).mean()

    metric = CLIPImageSimilarity(clip)
    metric.set_reference(real_u8.float() / 255)
    metric.update(gen_u8[:4].float() / 255)  # two updates: the mean is over all images
    metric.update(gen_u8[4:].float() / 255)
    torch.testing.assert_close(metric.compute(), expected_i, atol=1e-5, rtol=0)

    templates = ["a {} on the beach", "a red {}", "a {} in the snow", "a {}", "a shiny {}", "a wet {}"]
    texts = [clip_t_text(t, "dog") for t in templates]
    assert texts[0] == "a dog on the beach" and clip_t_text("a {} in the snow", "dog", mode="remove") == "a in the snow"
    tok = clip.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        txt = F.normalize(model.get_text_features(**tok).pooler_output, dim=-1)
    expected_t = (gen * txt).sum(-1).mean()
    metric_t = CLIPTextSimilarity(clip)
    metric_t.update(gen_u8.float() / 255, texts)
    torch.testing.assert_close(metric_t.compute(), expected_t, atol=1e-5, rtol=0)
    assert not torch.isclose(expected_t, expected_i)  # the two metrics do measure different things


@pytest.mark.parametrize("kind", ["dino", "dinov2"])
def test_dino_equals_direct_computation(kind):
    folder = tiny_backbone_folder(kind)
    backbone = load_dino_backbone(folder)
    gen_u8, real_u8 = _uint8_images(5, seed=5), _uint8_images(3, seed=6)
    cls = lambda px: backbone.model(pixel_values=px).last_hidden_state[:, 0]  # noqa: E731
    expected = (_direct_image_embeddings(folder, cls, gen_u8) @ _direct_image_embeddings(folder, cls, real_u8).T).mean()
    metric = DINOSimilarity(backbone)
    metric.set_reference(real_u8.float() / 255)
    metric.update(gen_u8.float() / 255)
    tol = 1e-5 if kind == "dino" else 0.02  # DINOv2 resizes: torch vs PIL resampling
    torch.testing.assert_close(metric.compute(), expected, atol=tol, rtol=0)


def test_concept_metrics_share_backbones_and_match_single_metrics(clip, dino):
    gen, real = _uint8_images(4, seed=7).float() / 255, _uint8_images(3, seed=8).float() / 255
    templates = ["a {} on the beach"] * 2 + ["a red {}"] * 2
    cm = ConceptMetrics(clip_backbone=clip, dino_backbone=dino)
    cm.set_concept(real, superclass="backpack")
    cm.update(gen, templates)
    values = cm.compute()
    assert set(values) == {"clip_i", "clip_t", "dino"}

    ci, ct, d = CLIPImageSimilarity(clip), CLIPTextSimilarity(clip), DINOSimilarity(dino)
    ci.set_reference(real), d.set_reference(real)
    ci.update(gen), d.update(gen), ct.update(gen, [t.format("backpack") for t in templates])
    assert values["clip_i"] == pytest.approx(float(ci.compute()), abs=1e-6)
    assert values["clip_t"] == pytest.approx(float(ct.compute()), abs=1e-6)
    assert values["dino"] == pytest.approx(float(d.compute()), abs=1e-6)

    # a generated set identical to the real one scores CLIP-I above any other
    cm.set_concept(real, superclass="backpack")
    cm.update(real, ["a {}"] * 3)
    assert cm.compute()["clip_i"] > values["clip_i"]


def test_reference_cache_embeds_once_and_persists(clip, tmp_path):
    calls = []
    real = _uint8_images(3, seed=9).float() / 255
    cache = ReferenceCache(tmp_path / "emb")
    original = clip.embed_images
    clip.embed_images = lambda images: calls.append(len(images)) or original(images)
    try:
        a = cache.get(clip, real)
        b = cache.get(clip, real)
        other = cache.get(clip, real.flip(-1))
        c = ReferenceCache(tmp_path / "emb").get(clip, real)  # a new process: read from disk
    finally:
        del clip.embed_images
    assert calls == [3, 3]  # once for real, once for the flipped images; never again
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert not torch.allclose(a, other)
    assert len(list((tmp_path / "emb").glob("*.pt"))) == 2


def test_reference_cache_reads_image_folders(clip, tmp_path):
    imgs = _uint8_images(2, h=40, w=50, seed=10)
    for i, pil in enumerate(_pil(imgs)):
        pil.save(tmp_path / f"{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    emb = ReferenceCache().get(clip, tmp_path)
    torch.testing.assert_close(emb, clip.embed_images([im.float() / 255 for im in imgs]), atol=1e-6, rtol=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No images"):
        ReferenceCache().get(clip, tmp_path / "empty")


def test_loader_errors_name_the_problem(tmp_path):
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(tiny_backbone_folder("clip"), folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_clip_backbone(folder)
    with pytest.raises(ValueError, match="not CLIP"):
        load_clip_backbone(tiny_backbone_folder("dino"))
    with pytest.raises(ValueError, match="ViTModel"):
        load_dino_backbone(tiny_backbone_folder("clip"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip_backbone(tmp_path / "missing")
    with pytest.raises(ValueError, match="backend"):
        load_clip_backbone(folder, backend="jax")
    with pytest.raises(ValueError, match="superclass"):
        ConceptMetrics(clip=None, dino=None, clip_t_mode="prefix")


def test_open_clip_backend_is_optional():
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="personalize\\[openclip\\]"):
            load_clip_backbone("ViT-B-32/openai", backend="open_clip")
        return
    pytest.skip("open_clip is installed: its weights cannot be downloaded here, nothing to check offline")


@pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason="DreamBooth dataset not present")
def test_real_dreambooth_folder_scores_itself_highest(clip, dino):
    cm = ConceptMetrics(clip_backbone=clip, dino_backbone=dino)
    cm.set_concept(DREAMBOOTH / "dog", superclass="dog")
    from metrics import load_images

    own = load_images(DREAMBOOTH / "dog")
    own = torch.stack([F.interpolate(im[None], size=(32, 32), mode="area")[0] for im in own])
    cm.update(own, ["a {}"] * len(own))
    self_score = cm.compute()["dino"]
    cm.reset()
    cm.update(torch.rand(len(own), 3, 32, 32, generator=torch.Generator().manual_seed(0)), ["a {}"] * len(own))
    assert self_score > cm.compute()["dino"]
