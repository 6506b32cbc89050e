"""Parity of miniproclip.image with transformers' PIL/NumPy CLIP image processor (CLIPImageProcessorPil).

Both sides call the same PIL bicubic resize on the same uint8 pixels, so the outputs agree to float32 rounding;
the measured maximum difference is 0, and the tests allow 1e-6.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from miniproclip.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageReadError, ImageTransform, load_image

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
