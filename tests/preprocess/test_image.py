"""Image inputs: modes, transparency, EXIF orientation, and every kind of bad input."""
import numpy as np
import pytest
from PIL import Image

from molmo.preprocess import ImageError, load_image


def test_paths_pil_images_and_arrays_agree(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    assert np.array_equal(load_image(tmp_path / "x.png"), a)
    assert np.array_equal(load_image(str(tmp_path / "x.png")), a)
    assert np.array_equal(load_image(Image.fromarray(a)), a)
    assert np.array_equal(load_image(a), a)


def test_grayscale_becomes_rgb():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = load_image(g)
    assert out.shape == (3, 4, 3) and (out == g[..., None]).all()
    assert np.array_equal(load_image(Image.fromarray(g, "L")), out)


def test_transparent_bright_image_goes_on_black_and_dark_on_white():
    bright = np.full((4, 4, 4), 255, dtype=np.uint8)
    bright[..., 3] = 0  # fully transparent white: grayscale mean 255 > 127 -> black background
    assert (load_image(bright) == 0).all()
    dark = np.zeros((4, 4, 4), dtype=np.uint8)  # transparent black -> white background
    assert (load_image(dark) == 255).all()
    half = np.full((4, 4, 4), 200, dtype=np.uint8)
    half[..., 3] = 255  # opaque pixels stay as they are
    assert (load_image(half) == 200).all()
    p = Image.fromarray(np.zeros((4, 4), dtype=np.uint8), "P")
    p.info["transparency"] = 0
    assert (load_image(p) == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (40, 20, 3)


def test_bad_inputs_each_raise_one_clear_error(tmp_path):
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match="notes.txt: not an image file"):
        load_image(tmp_path / "notes.txt")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png: corrupt or truncated"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="over the pixel limit"):
        load_image(tmp_path / "t.png", max_pixels=100)
    with pytest.raises(ImageError, match="must be uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ImageError, match="got shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(12)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("L", (20_000, 10_000)).save(tmp_path / "bomb.png")  # compresses to a few hundred KB
    with pytest.raises(ImageError, match="20000x10000 is over the pixel limit of 100,000,000") as e:
        load_image(tmp_path / "bomb.png")
    assert "bomb.png" in str(e.value)
