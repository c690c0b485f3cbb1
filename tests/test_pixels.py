"""Every PIL image mode becomes the right 8-bit RGB (16-bit and float grey scaled, not clipped;
transparency composited onto white), and a 16-bit grey concept image trains as itself."""

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
