"""SigLIP towers (siglip.py) against transformers' SiglipModel and open_clip's timm-trunk SigLIP, on tiny random
models written here; the tokenizer, the preprocessing, training and eval.py on a SigLIP folder.

Tolerance: 1e-4 max abs difference in fp32 (same math, different kernels).
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from fixtures import WORDS
from miniproclip.backbones import load_clip, load_tokenizer, load_transform
from miniproclip.siglip import SigLIP
from miniproclip.weights import ModelFolderError

TOL = 1e-4
SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}  # Gemma's first ids (SigLIP2)


def write_tiny_siglip(folder, seed=0, image_size=32):
    """A tiny random HF SiglipModel folder with a Gemma-style word-level tokenizer.json (SigLIP2's specials) and
    SigLIP's preprocessor_config.json; returns (folder, transformers model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.SiglipConfig(text_config=dict(vocab_size=64, max_position_embeddings=64, **tower),
                                       vision_config=dict(image_size=image_size, patch_size=8, **tower))
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # HF's constant inits, randomised so that a wrong mapping shows
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-7.0)
        model.vision_model.head.probe.normal_()
        model.vision_model.head.attention.in_proj_bias.normal_()
    model.save_pretrained(folder)
    vocab = {**SPECIALS, **{w: i + len(SPECIALS) for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GemmaTokenizer", "pad_token": "<pad>", "eos_token": "<eos>"}, f)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "SiglipImageProcessor", "do_resize": True, "do_rescale": True,
                   "do_normalize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,
                   "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, f)
    return str(folder), model


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    return write_tiny_siglip(tmp_path_factory.mktemp("siglip") / "siglip")


@pytest.mark.parametrize("size", [32, 48])  # the trained 4x4 grid, and 6x6 through interpolated positions
def test_features_match_transformers(siglip, size):
    folder, reference = siglip
    ours = load_clip(folder)
    assert isinstance(ours, SigLIP)
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    ids = torch.randint(0, 64, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs_image = reference.get_image_features(pixel_values=pixels, interpolate_pos_encoding=size != 32)
        theirs_text = reference.get_text_features(input_ids=ids)
        image, text = ours.encode_image(pixels), ours.encode_text(ids)
    assert image.shape == (3, 32) and text.shape == (3, 32)
    assert (image - theirs_image.pooler_output).abs().max() < TOL
    assert (text - theirs_text.pooler_output).abs().max() < TOL
    assert ours.logit_scale.item() == pytest.approx(2.3) and ours.logit_bias.item() == pytest.approx(-7.0)


def test_tokenizer_pads_the_window_after_eos(siglip, tmp_path):
    """SigLIP2 (Gemma vocabulary): lowercased, no BOS, EOS kept last when cut, `<pad>` to the 64-token window;
    SigLIP (`</s>`): punctuation removed as well (SiglipTokenizer.canonicalize_text), padded with `</s>`."""
    folder, _ = siglip
    tokens = load_tokenizer(folder)(["A  Photo of the RED cat", " ".join(["dog"] * 70)])
    word = lambda w: WORDS.index(w) + len(SPECIALS)
    expected = [word(w) for w in "a photo of the red cat".split()] + [1]
    assert tokens.input_ids.shape == (2, 64)
    assert tokens.input_ids[0].tolist() == expected + [0] * (64 - len(expected))
    assert tokens.input_ids[1].tolist() == [word("dog")] * 63 + [1] and tokens.truncated.tolist() == [False, True]
    # the SigLIP (v1) conventions, on the same words under SentencePiece-T5 specials
    from tokenizers import Tokenizer, models, pre_tokenizers
    v1 = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(v1, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(tmp_path / "v1")
    tokenizer.save(str(tmp_path / "v1" / "tokenizer.json"))
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(folder, name), tmp_path / "v1" / name)
    ids = load_tokenizer(str(tmp_path / "v1"))(["A red, dotted cat!"]).input_ids[0].tolist()
    assert ids == [v1[w] for w in "a red dotted cat".split()] + [1] * 60


def test_transform_equals_siglip_image_processor(siglip):
    """Squash resize to 32x32 (no crop), bicubic, rescale, mean = std = 0.5: transformers' PIL path, to fp32."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    folder, _ = siglip
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (57, 40, 3), dtype=np.uint8))
    theirs = SiglipImageProcessorPil.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"][0]
    ours = load_transform(folder)(image)
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert (ours - theirs).abs().max() < 1e-6
