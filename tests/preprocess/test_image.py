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


def test_exif_orientation_is_applied_to_paths_and_pil_images_alike(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 10))  # a blue corner shows which way is up
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    img.save(tmp_path / "r.png", exif=exif)
    from_path = load_image(tmp_path / "r.png")
    assert from_path.shape == (40, 20, 3) and from_path[0, -1, 2] == 255  # blue corner now top right
    with Image.open(tmp_path / "r.png") as opened:
        assert np.array_equal(load_image(opened), from_path)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_16_bit_32_bit_and_float_images_are_scaled_by_their_full_range(tmp_path, mode):
    ramp = np.linspace(0, 65535, 256 * 4).reshape(4, 256)
    if mode == "I;16":
        Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "d.png")  # a 16-bit PNG
        out = load_image(tmp_path / "d.png")
    elif mode == "I":
        out = load_image(Image.fromarray(ramp.astype(np.int32)))
    else:
        out = load_image(Image.fromarray((ramp / 65535 * 7 - 2).astype(np.float32)))  # any range: min..max
    want = np.round(ramp / 65535 * 255)
    assert out.shape == (4, 256, 3) and np.abs(out[..., 0].astype(float) - want).max() <= 1
    assert (out == 255).mean() < 0.01  # not whited out


def test_urls_and_closed_images_get_one_clear_error(tmp_path):
    with pytest.raises(ImageError, match="URLs are not fetched"):
        load_image("https://example.com/cat.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    img = Image.open(tmp_path / "a.png")
    img.close()
    with pytest.raises(ImageError, match="unusable image"):
        load_image(img)


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
