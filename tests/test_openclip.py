"""open_clip folders read by miniproclip equal open_clip's own reading of them, on tiny random models it writes.

The reference is `open_clip.create_model('local-dir:FOLDER')` (its factory, config and checkpoint loading), with
timm's Eva as the EVA02 trunk. Tolerance: 1e-4 max abs difference of fp32 features (measured ~1e-6: the same
math in other kernels). Each case prints its measured difference (pytest -s shows them).
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from openclip_models import eva_config, import_references, tiny_timm, vit_config, write_open_clip
from miniproclip import openclip
from miniproclip.backbones import load_clip, load_transform
from miniproclip.tokenizer import CLIPTokenizer
from miniproclip.weights import ModelFolderError

open_clip, timm = import_references()
TOL = 1e-4
CAPTIONS = ["a photo of a cat", "two dogs on the grass next to a red car", "a diagram"]


def max_diff(a, b):
    return (a - b).abs().max().item()


def open_clip_ids(texts):
    return open_clip.get_tokenizer("ViT-B-32")(texts)  # its SimpleTokenizer: (B, 77), EOS 49407, zero padding


@pytest.mark.parametrize("case", ["quick_gelu+layer_scale", "gelu+custom_text+bin"])
def test_vit_features_match_open_clip(tmp_path, case):
    plain = case.startswith("gelu")
    config = vit_config(quick_gelu=not plain, layer_scale=not plain, custom_text=plain)
    reference = write_open_clip(tmp_path, config, weights="bin" if plain else "safetensors")
    ours = load_clip(str(tmp_path))
    assert ours.vision_model.encoder.layers[0].mlp.act.__name__ == ("gelu" if plain else "quick_gelu")
    assert hasattr(ours.text_model.encoder.layers[1], "layer_scale2") == (not plain)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = open_clip_ids(CAPTIONS)
    assert torch.equal(CLIPTokenizer.from_folder(str(tmp_path))(CAPTIONS).input_ids, ids)  # no tokenizer.json there
    with torch.no_grad():
        image, text = max_diff(ours.encode_image(pixels), reference.encode_image(pixels)), \
            max_diff(ours.encode_text(ids), reference.encode_text(ids))
    print(f"{case}: image {image:.2e}, text {text:.2e}")
    assert image < TOL and text < TOL
    assert ours.logit_scale.item() == pytest.approx(reference.logit_scale.item())


@pytest.mark.parametrize("timm_name", ["eva02_base_patch16_clip_224", "eva02_large_patch14_clip_336"])
def test_eva02_features_match_open_clip_and_timm(tmp_path, monkeypatch, timm_name):
    tiny_timm(monkeypatch)
    reference = write_open_clip(tmp_path, eva_config(timm_name))
    ours = load_clip(str(tmp_path))
    size = 336 if timm_name.endswith("336") else 224
    assert (ours.config.vision.image_size, ours.config.vision.num_attention_heads) == (size, 2)
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = open_clip_ids(CAPTIONS)
    with torch.no_grad():
        image = max_diff(ours.encode_image(pixels), reference.encode_image(pixels))
        text = max_diff(ours.encode_text(ids), reference.encode_text(ids))
        trunk = max_diff(ours.encode_image(pixels), reference.visual.trunk(pixels))  # timm's Eva itself
        # RoPE matters here: unscaled positions (reference grid = the 14 or 24 grid) move the features
        ours.config.vision.rope_reference_grid = size // ours.config.vision.patch_size
        unscaled = max_diff(ours.encode_image(pixels), reference.encode_image(pixels))
    print(f"{timm_name}: image {image:.2e}, text {text:.2e}, unscaled RoPE {unscaled:.2e}")
    assert image < TOL and text < TOL and trunk < TOL
    assert unscaled > 100 * TOL


@pytest.mark.parametrize("mode", ["shortest", "squash"])
def test_preprocessing_matches_open_clip(tmp_path, mode):
    preprocess = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25], "interpolation": "bilinear", "resize_mode": mode}
    write_open_clip(tmp_path, vit_config(), preprocess)
    _, _, reference = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    ours = load_transform(str(tmp_path))
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)  # even crop margins
    image = Image.fromarray(pixels)
    assert ours(image).shape == (3, 32, 32)
    assert max_diff(ours(image), reference(image)) < 1e-5


def test_key_mappings_round_trip(tmp_path, monkeypatch):
    tiny_timm(monkeypatch)
    for name, config in [("vit", vit_config(custom_text=True)), ("eva", eva_config("eva02_base_patch16_clip_224"))]:
        state = write_open_clip(tmp_path / name, config).state_dict()
        ours = openclip.to_ours(state)
        back = openclip.from_ours(ours, eva=name == "eva", text_prefix="text.")
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state), name


def test_bad_files_are_one_line_errors_naming_the_file_and_the_remedy(tmp_path, monkeypatch):
    write_open_clip(tmp_path / "cut", vit_config())
    weights_path = tmp_path / "cut" / "open_clip_model.safetensors"
    weights = load_file(weights_path)
    del weights["visual.ln_post.weight"]
    save_file(weights, weights_path)
    with pytest.raises(ModelFolderError) as error:
        load_clip(str(tmp_path / "cut"))
    assert str(error.value) == (f"{weights_path}: weights do not match the model built from its config; 1 missing: "
                                f"vision_model.post_layernorm.weight; download the folder again, or use the "
                                f"open_clip_config.json that came with these weights")

    # a pickle that needs more than tensors is refused, and its payload never runs
    write_open_clip(tmp_path / "evil", vit_config(), weights="bin")
    marker, pickle_path = tmp_path / "pwned", tmp_path / "evil" / "open_clip_pytorch_model.bin"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Exploit(marker)}, pickle_path)
    with pytest.raises(ModelFolderError) as error:
        load_clip(str(tmp_path / "evil"))
    message = str(error.value)
    assert message.startswith(f"{pickle_path}: cannot be read as tensors only (") and "\n" not in message
    assert message.endswith("miniproclip never runs pickled code: save the state dict alone "
                            "(torch.save(model.state_dict(), path)) or as safetensors")
    assert not marker.exists()

    # a timm tower not known by name, whose weights fit no EVA02 layout
    tiny_timm(monkeypatch)
    write_open_clip(tmp_path / "odd", eva_config("eva02_base_patch16_clip_224"))
    config_path = tmp_path / "odd" / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    config["model_cfg"]["vision_cfg"]["timm_model_name"] = "convnext_tiny"
    config_path.write_text(json.dumps(config))
    weights = {k: v for k, v in load_file(tmp_path / "odd" / "open_clip_model.safetensors").items()
               if not k.startswith("visual.trunk.blocks.")}
    save_file(weights, tmp_path / "odd" / "open_clip_model.safetensors")
    with pytest.raises(ModelFolderError, match=r"open_clip_model.safetensors: timm tower 'convnext_tiny' with weights "
                       r"that fit no EVA02 tower \(KeyError: .*\); miniproclip reads the timm towers "
                       r"eva02_base_patch16_clip_224, .* \(open_clip's EVA02-B-16, EVA02-L-14, EVA02-L-14-336\)$"):
        load_clip(str(tmp_path / "odd"))

    # an architecture option this loader does not reproduce
    (tmp_path / "pool").mkdir()
    bad = vit_config()
    bad["vision_cfg"]["pool_type"] = "avg"
    (tmp_path / "pool" / "open_clip_config.json").write_text(json.dumps({"model_cfg": bad}))
    save_file({"logit_scale": torch.zeros(())}, tmp_path / "pool" / "open_clip_model.safetensors")
    with pytest.raises(ModelFolderError, match=r"open_clip option vision_cfg.pool_type='avg' is not supported"):
        load_clip(str(tmp_path / "pool"))
    with pytest.raises(ModelFolderError, match="no config.json; expected a Hugging Face model folder .CLIPModel., "
                       "or an open_clip folder with open_clip_config.json"):
        load_clip(str(tmp_path))


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
