"""Every PIL image mode becomes the right 8-bit RGB (16-bit and float grey scaled, not clipped;
transparency composited onto white), a 16-bit grey concept image trains as itself, and every
PIL/uint8 <-> float conversion goes through components/pixels.py with the bits of the copies it replaced."""

from __future__ import annotations

import numpy as np

from components.pixels import to_rgb


def open_image(path):
    from PIL import Image

    image = Image.open(path)
    image.load()
    return image


def _png16(path, array) -> None:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3)) written by hand: PIL cannot write 16-bit RGB."""
    import struct
    import zlib

    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if array.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_every_image_mode_becomes_the_right_8_bit_rgb(tmp_path):
    from PIL import Image

    ramp16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)  # 0, 100, 255 in 8 bits
    _png16(tmp_path / "grey16.png", ramp16)
    rgb16 = np.zeros((1, 2, 3), dtype=np.uint16)
    rgb16[0, 0] = (65535, 257 * 128, 0)
    _png16(tmp_path / "rgb16.png", rgb16)
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 0  # index 0 (red) transparent
    palette.save(tmp_path / "palette.png")
    cases = {
        "I;16": (open_image(tmp_path / "grey16.png"), [[0, 100, 255]]),
        "I": (Image.fromarray(ramp16.astype(np.int32)), [[0, 100, 255]]),
        "F [0, 1]": (Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), [[0, 128, 255]]),
        "F [0, 255]": (Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32)), [[0, 100, 255]]),
        "LA": (Image.fromarray(np.array([[[0, 255], [0, 0]]], dtype=np.uint8), mode="LA"), [[0, 255]]),
        "CMYK": (Image.new("CMYK", (1, 1), (0, 255, 255, 0)), [[(255, 0, 0)]]),
        "RGB 16-bit": (open_image(tmp_path / "rgb16.png"), [[(255, 128, 0), (0, 0, 0)]]),
        "P + transparency": (open_image(tmp_path / "palette.png"), [[(255, 255, 255), (0, 0, 255)]]),
    }
    for name, (image, expected) in cases.items():
        rgb = to_rgb(image)
        assert rgb.mode == "RGB", name
        got = np.asarray(rgb).astype(int)
        want = np.array(expected)
        want = np.repeat(want[..., None], 3, axis=-1) if want.ndim == 2 else want
        assert np.array_equal(got, want), (name, got.tolist())


def test_a_16_bit_grey_concept_image_is_not_read_as_white(tmp_path):
    from datamodules.concept import load_concept_folder

    _png16(tmp_path / "00.png", np.full((40, 40), 257 * 60, dtype=np.uint16))
    (image,) = load_concept_folder(tmp_path, min_size=32)
    assert np.asarray(image.image).max() == 60 and np.asarray(image.image).min() == 60


# ---------------------------------------------------------------------------- one place for conversions
# The formulas each call site wrote by hand before it went through components.pixels (issue 9
# item 5), kept here as the reference: the helpers must give the same bits (and memory layout).

import re  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def old_pil_signed(img):  # datamodules/concept.py to_tensor
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def old_pil_unit(img):  # metrics/reference.py, edit.py, callbacks/sampling.py
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def old_batch_signed(images):  # miniworld/data.py to_tensor
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def old_pil_of(image):  # sample.py, hifi_generation, reference_guided's captions, segmentation
    return (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()


def old_signed_uint8(images):  # miniworld/quality.py save_grid
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def sample_pixels():
    """Random uint8 images with the edge values 0, 1, 127, 128, 254, 255, and float images
    beyond both ranges and at the rounding midpoints."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    arr[0, 0, :6, 0] = [0, 1, 127, 128, 254, 255]
    floats = torch.cat([torch.linspace(-1.3, 1.3, 2 * 3 * 20 * 24).reshape(2, 3, 20, 24),
                        torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0)),
                        (torch.arange(2 * 3 * 20 * 24).reshape(2, 3, 20, 24) % 256 + 0.5) / 255])
    return arr, floats


def same(a, b):
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


def test_helpers_give_the_bits_of_the_hand_written_conversions(sample_pixels):
    from components.pixels import (SIGNED, from_uint8, pil_to_tensor, signed_to_unit, tensor_to_pil, to_uint8,
                                   unit_to_signed)

    arr, floats = sample_pixels
    img = Image.fromarray(arr[0])
    assert same(pil_to_tensor(img), old_pil_unit(img))
    assert same(pil_to_tensor(img, SIGNED), old_pil_signed(img))
    assert same(from_uint8(arr, SIGNED), old_batch_signed(arr.copy()))
    assert same(from_uint8(arr[1]), old_pil_unit(arr[1]))
    assert torch.equal(from_uint8(torch.from_numpy(arr))[0], old_pil_unit(arr[0]))  # a uint8 tensor too
    for image in floats:
        assert same(np.asarray(tensor_to_pil(image)), old_pil_of(image))
    assert same(to_uint8(floats, SIGNED), old_signed_uint8(floats))
    assert same(to_uint8(floats), (floats.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert torch.equal(unit_to_signed(floats), floats * 2 - 1) and torch.equal(signed_to_unit(floats), floats / 2 + 0.5)
    assert torch.equal(unit_to_signed(floats), floats.mul(2).sub(1))  # miniworld/metrics.py's spelling
    # the two ranges are the same image: 8 bits there and back
    assert same(to_uint8(from_uint8(arr)), arr) and same(to_uint8(from_uint8(arr, SIGNED), SIGNED), arr)
    with pytest.raises(ValueError, match="value_range"):
        from_uint8(arr, (0, 255))


def test_call_sites_read_and_write_the_same_pixels(sample_pixels, tmp_path):
    """Each former copy, called where it lives now, against its old formula."""
    import edit
    import sample
    from callbacks.sampling import SamplerValidation
    from datamodules.concept import to_tensor
    from metrics.reference import load_images
    from miniworld import hifi_generation, quality
    from miniworld.data import to_tensor as world_tensor
    from miniworld.metrics import to_judge_input

    arr, floats = sample_pixels
    (tmp_path / "ref").mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp_path / "ref" / f"{i:02d}.png")
    img = Image.fromarray(arr[0])
    assert same(to_tensor(img), old_pil_signed(img))
    assert same(world_tensor(arr.copy()), old_batch_signed(arr.copy()))
    assert all(same(a, old_pil_unit(b)) for a, b in zip(load_images(tmp_path / "ref"), arr))
    assert same(edit.read_image(str(tmp_path / "ref" / "00.png")), old_pil_unit(arr[0]))
    validation = SamplerValidation(samplers=["concept"], clip="tiny")
    dm = SimpleNamespace(concept_images=[SimpleNamespace(image=Image.fromarray(a)) for a in arr])
    assert all(same(a, old_pil_unit(b)) for a, b in zip(validation._reference(SimpleNamespace(datamodule=dm)), arr))
    for k, image in enumerate(floats):
        sample.save_png(image, tmp_path / f"{k}.png")
        assert same(np.asarray(Image.open(tmp_path / f"{k}.png")), old_pil_of(image))
    quality.save_grid(floats, str(tmp_path / "q.png"), per_row=3, scale=1)
    x = old_signed_uint8(floats)
    assert same(np.asarray(Image.open(tmp_path / "q.png")), np.concatenate([np.concatenate(list(x[:3]), 1),
                                                                            np.concatenate(list(x[3:6]), 1)], 0))
    grid = hifi_generation._grid([floats[:2], floats[2:4]], scale=1)
    assert same(np.asarray(grid)[2:22, 2:26], old_pil_of(floats[0]))
    x = floats[:, :, :16, :16]
    assert same(to_judge_input(x, size=16), x.float().mul(2).sub(1).clamp(-1, 1))


def test_no_hand_written_image_conversion_left():
    """PIL/uint8 <-> float tensor conversions go through components/pixels.py. Left alone:
    the MiniWorld renderer's and the demo concept's numpy drawings (world.py, concepts.py,
    synthetic.py: float arrays rounded half up in numpy, as the committed renders were made;
    bool masks as 0/255) and the metrics' image-processor settings (preprocess.py)."""
    pattern = re.compile(r"permute\((2, 0, 1|1, 2, 0|0, 3, 1, 2|0, 2, 3, 1)\)|127\.5|\* 255\)|/ 255\b|\.byte\(\)"
                         r"|\* 2 - 1|/ 2 \+ 0\.5|\.mul\(2\)\.sub\(1\)")
    folders = ("components", "datamodules", "metrics", "samplers", "editing", "evaluation", "callbacks", "miniworld")
    files = [f for d in folders for f in sorted((ROOT / d).rglob("*.py"))] + [ROOT / n for n in ("sample.py", "edit.py",
                                                                                                  "evaluate.py")]
    allowed = {"components/pixels.py", "miniworld/world.py", "miniworld/concepts.py", "datamodules/synthetic.py",
               "metrics/preprocess.py"}
    found = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files if str(f.relative_to(ROOT)) not in allowed
             for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line) and "x / 255 differs" not in line]
    assert not found, found
