"""Parity of miniproclip.image with transformers' PIL/NumPy CLIP image processor (CLIPImageProcessorPil), image
reading, and the training crop's reduced-size JPEG decode.

Both sides call the same PIL bicubic resize on the same uint8 pixels, so the outputs agree to float32 rounding;
the measured maximum difference is 0, and the tests allow 1e-6. The training crop's `load` draws the same boxes as
decoding first and cropping after; on a JPEG it decodes at 1/2 or 1/4 size where the crop allows it, and the 224×224
crop then differs from the full decode's by a mean of 0.37–0.42 levels of 255 (measured on `photo_jpeg`'s images).
"""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPImageProcessorPil

import miniproclip.image as image_module
from miniproclip.image import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageReadError, ImageTransform,
                               RandomResizedCropTransform, jpeg_draft_scale, load_image, random_resized_crop_box)

TOLERANCE = 1e-6


def random_image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1, "P": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    # smooth half of the image so the resize sees gradients as well as noise
    pixels[: height // 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode="L" if mode == "P" else mode)
    if mode == "P":
        image = image.convert("RGB").quantize(colors=64)
        image.info["transparency"] = 5  # palette index 5 is transparent
    return image


def hf_pixels(image, folder=None):
    processor = CLIPImageProcessorPil.from_pretrained(folder) if folder else CLIPImageProcessorPil()
    return torch.from_numpy(processor(image, return_tensors="np")["pixel_values"][0])


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("width,height", [(300, 200), (200, 451), (224, 224), (97, 513), (30, 17), (225, 224)])
def test_matches_transformers_rgb(width, height):
    image = random_image(width, height, seed=width * height)
    ours = ImageTransform()(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert max_diff(ours, hf_pixels(image)) <= TOLERANCE


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P"])
def test_matches_transformers_other_modes(mode):
    image = random_image(161, 260, mode=mode, seed=7)
    assert max_diff(ImageTransform()(image), hf_pixels(image)) <= TOLERANCE


def test_hand_computed_solid_color():
    image = Image.new("RGB", (320, 240), (255, 0, 128))
    pixels = ImageTransform()(image)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    assert torch.allclose(pixels[:, 0, 0], torch.tensor(expected), atol=1e-6)
    assert torch.allclose(pixels[:, 100, 17], torch.tensor(expected), atol=1e-6)


CUSTOM_CONFIGS = [
    {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}, "resample": 3,
     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]},
    {"size": 47, "crop_size": 64},  # old-style ints; crop larger than the image (odd shortfall): HF zero-pads
    {"size": {"height": 100, "width": 50}, "crop_size": {"height": 64, "width": 33}, "resample": 2},
    {"size": {"shortest_edge": 80}, "do_center_crop": False, "do_normalize": False},
    {"do_resize": False, "crop_size": {"height": 150, "width": 300}, "do_rescale": False},
]


@pytest.mark.parametrize("config", CUSTOM_CONFIGS)
def test_custom_preprocessor_config(config, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    transform = ImageTransform.from_folder(str(tmp_path))
    for width, height in [(300, 200), (97, 213)]:
        image = random_image(width, height, seed=width)
        assert max_diff(transform(image), hf_pixels(image, tmp_path)) <= TOLERANCE


def test_custom_config_fields(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CUSTOM_CONFIGS[0]))
    transform = ImageTransform.from_folder(str(tmp_path))
    assert (transform.size, transform.crop_size) == (64, (64, 64))
    assert transform.mean == (0.5, 0.5, 0.5) and transform.std == (0.25, 0.5, 1.0)
    assert ImageTransform()(random_image(300, 200)).shape == (3, 224, 224)
    assert transform(random_image(300, 200)).shape == (3, 64, 64)


def test_missing_config_gives_clip_defaults(tmp_path):
    assert ImageTransform.from_folder(str(tmp_path)) == ImageTransform(
        size=224, crop_size=(224, 224), rescale_factor=1 / 255, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resample=3)


def test_bad_size_config_names_file(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 64}}))
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        ImageTransform.from_folder(str(tmp_path))


def test_load_image(tmp_path):
    pixels = np.zeros((20, 30, 4), dtype=np.uint8)
    pixels[:, :15] = (10, 20, 30, 255)  # opaque left half, fully transparent right half
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "a.png")
    image = load_image(str(tmp_path / "a.png"))
    assert image.mode == "RGB" and image.size == (30, 20)
    assert image.getpixel((0, 0)) == (10, 20, 30) and image.getpixel((29, 0)) == (255, 255, 255)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_image_raises(content, tmp_path):
    path = tmp_path / "broken.jpg"
    if content == "truncated":
        random_image(64, 64).save(path, quality=95)
        content = path.read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=str(path)):
        load_image(str(path))
    with pytest.raises(ImageReadError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"))


# ----------------------------------------------------------------------------- training crops: JPEG draft

PIXELS_0_255 = ImageTransform(rescale_factor=None, mean=None, std=None)  # 224×224 outputs in levels of 0..255


def photo_jpeg(width, height, seed=0) -> bytes:
    """A quality-90 JPEG with a photo's ingredients: smooth shading, 40 sharp-edged shapes, sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([120 + 80 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0, 1, 2)], -1)
    image = Image.fromarray(np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        left, top = rng.integers(0, width), rng.integers(0, height)
        box = [left, top, left + rng.integers(10, width // 3), top + rng.integers(10, height // 3)]
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_jpeg_draft_scale():
    """The largest of 8, 4, 2 that leaves the crop ≥ the output in both dimensions, else 1."""
    assert jpeg_draft_scale(970, 730, 224, 224) == 2  # a 1024×768 photo's crop
    assert jpeg_draft_scale(1900, 1400, 224, 224) == 4  # 1400 < 8 × 224 = 1792
    assert jpeg_draft_scale(3600, 1800, 224, 224) == 8
    assert jpeg_draft_scale(475, 356, 224, 224) == 1  # a 500×375 photo's crop: 356 / 2 < 224
    assert jpeg_draft_scale(448, 448, 224, 224) == 2 and jpeg_draft_scale(447, 448, 224, 224) == 1
    assert jpeg_draft_scale(900, 300, 224, 100) == 2  # (width, height) each against its own output side


@pytest.mark.parametrize("width,height,expected_scale", [(1024, 768, 2), (768, 1024, 2), (2048, 1536, 4)])
def test_drafted_crop_is_the_same_box_and_close_to_the_full_decode(width, height, expected_scale, monkeypatch):
    """Same seeds: the same boxes (drawn on the original size) and generator states as decode-then-crop, a decode
    at 1/expected_scale, and pixels within a mean of 1 level of 255 of the full decode's (0.25–0.42 measured)."""
    data = photo_jpeg(width, height)
    boxes, scales = [], []
    draw, draft = image_module.random_resized_crop_box, image_module.draft_jpeg
    monkeypatch.setattr(image_module, "random_resized_crop_box", lambda *a: boxes.append(draw(*a)) or boxes[-1])
    monkeypatch.setattr(image_module, "draft_jpeg", lambda *a: scales.append(draft(*a)) or scales[-1])
    drafted, full = RandomResizedCropTransform(base=PIXELS_0_255), RandomResizedCropTransform(base=PIXELS_0_255,
                                                                                               draft=False)
    for seed in range(6):
        generators = [torch.Generator().manual_seed(seed) for _ in range(3)]
        fast = drafted.load(io.BytesIO(data), generators[0])
        slow = full(load_image(io.BytesIO(data)), generators[1])  # decode everything, then crop (the old path)
        assert scales[-1] == expected_scale and boxes[-2] == boxes[-1]  # load()'s box, then __call__'s
        assert boxes[-1] == random_resized_crop_box(width, height, (0.9, 1.0), (3 / 4, 4 / 3), generators[2])
        assert all(torch.equal(g.get_state(), generators[2].get_state()) for g in generators[:2])  # same draws
        assert fast.shape == slow.shape == (3, 224, 224)
        error = (fast - slow).abs().mean().item()
        assert 0 < error < 1.0, error  # not the full decode's pixels, but within a level of them on average
        assert torch.equal(full.load(io.BytesIO(data), torch.Generator().manual_seed(seed)), slow)  # draft=False


@pytest.mark.parametrize("fmt,size", [("PNG", (1024, 768)), ("JPEG", (500, 375)), ("JPEG", (300, 200))])
def test_crops_that_do_not_allow_a_draft_are_decoded_as_before(fmt, size):
    """PNGs, and JPEGs whose crop is < 2 × 224 on a side, give exactly the pixels of decode-then-crop."""
    buffer = io.BytesIO()
    random_image(*size).save(buffer, format=fmt)
    transform = RandomResizedCropTransform(base=ImageTransform())
    for seed in range(3):
        fast = transform.load(io.BytesIO(buffer.getvalue()), torch.Generator().manual_seed(seed))
        assert torch.equal(fast, transform(load_image(io.BytesIO(buffer.getvalue())),
                                           torch.Generator().manual_seed(seed)))


def test_broken_jpeg_in_the_drafted_load_raises(tmp_path):
    path = tmp_path / "truncated.jpg"
    path.write_bytes(photo_jpeg(1024, 768)[:20000])  # headers fine, scan data cut short
    with pytest.raises(ImageReadError, match=str(path)):
        RandomResizedCropTransform(base=ImageTransform()).load(str(path), torch.Generator().manual_seed(0))
