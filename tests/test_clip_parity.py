"""CLIP parity with transformers' `CLIPModel` on tiny random checkpoints written by `save_pretrained`.

Tolerance: 1e-4 max abs difference in fp32 (measured differences are ~1e-6: same math, different kernels).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from miniproclip.clip import CLIP
from miniproclip.weights import ModelFolderError

TOL = 1e-4


def tiny_clip_config(hidden_act="quick_gelu", eos_token_id=49407):
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act=hidden_act, eos_token_id=eos_token_id, bos_token_id=49406,
                pad_token_id=1)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act=hidden_act)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


def save_tiny_clip(folder, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(tiny_clip_config(**kwargs)).eval()
    with torch.no_grad():  # HF inits class_embedding/logit_scale to constants: randomise so the test can fail
        model.logit_scale.fill_(3.1)
        model.vision_model.embeddings.class_embedding.normal_()
    model.save_pretrained(folder)
    return model


def random_ids(batch=3, length=77, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49000, (batch, length), generator=g)
    ids[:, 0] = 49406
    for row, eos_at in enumerate([5, 40, 76][:batch]):  # EOS then EOS-id padding, as the OpenAI tokenizer pads
        ids[row, eos_at:] = 49407
    return ids


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_clip_features_match_transformers(tmp_path, hidden_act):
    reference = save_tiny_clip(tmp_path, hidden_act=hidden_act)
    ours = CLIP.from_pretrained(str(tmp_path))
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids = random_ids()
    with torch.no_grad():
        theirs_image = reference.get_image_features(pixel_values=pixels).pooler_output
        theirs_text = reference.get_text_features(input_ids=ids).pooler_output
        assert (ours.encode_image(pixels) - theirs_image).abs().max() < TOL
        assert (ours.encode_text(ids) - theirs_text).abs().max() < TOL
    assert ours.logit_scale.item() == pytest.approx(3.1)


def test_legacy_eos_config_pools_at_argmax(tmp_path):
    """Old configs say eos_token_id 2: HF pools at argmax(ids); with EOS-padded ids that is the same position."""
    reference = save_tiny_clip(tmp_path, eos_token_id=2)
    ours = CLIP.from_pretrained(str(tmp_path))
    ids = random_ids()
    with torch.no_grad():
        theirs = reference.get_text_features(input_ids=ids).pooler_output
        assert (ours.encode_text(ids) - theirs).abs().max() < TOL
    # both conventions pool the same token when padding is the EOS id: compare with a new-style load
    new_config = json.loads((tmp_path / "config.json").read_text())
    new_config["text_config"]["eos_token_id"] = 49407
    (tmp_path / "config.json").write_text(json.dumps(new_config))
    with torch.no_grad():
        assert (CLIP.from_pretrained(str(tmp_path)).encode_text(ids) - theirs).abs().max() < TOL


def test_sharded_checkpoint_loads(tmp_path):
    reference = save_tiny_clip(tmp_path / "single")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    single, sharded = CLIP.from_pretrained(str(tmp_path / "single")), CLIP.from_pretrained(str(tmp_path / "sharded"))
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_bf16_load_and_grad_checkpointing_match(tmp_path):
    save_tiny_clip(tmp_path)
    model = CLIP.from_pretrained(str(tmp_path))
    assert CLIP.from_pretrained(str(tmp_path), dtype=torch.bfloat16).visual_projection.weight.dtype == torch.bfloat16
    pixels = torch.randn(2, 3, 32, 32)
    model.train()
    plain = model.encode_image(pixels)
    plain.sum().backward()
    grad_plain = model.vision_model.encoder.layers[0].mlp.fc1.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    checkpointed = model.encode_image(pixels)
    checkpointed.sum().backward()
    assert torch.allclose(plain, checkpointed)
    assert torch.allclose(grad_plain, model.vision_model.encoder.layers[0].mlp.fc1.weight.grad, atol=1e-6)


def test_wrong_image_size_is_a_clear_error(tmp_path):
    save_tiny_clip(tmp_path)
    with pytest.raises(ValueError, match="does not match the model's 32x32"):
        CLIP.from_pretrained(str(tmp_path)).encode_image(torch.randn(1, 3, 64, 64))


def test_llm_folder_given_as_clip_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_key_value_heads": 2}))
    with pytest.raises(ModelFolderError, match=f"{tmp_path}: model_type 'llama' is an LLM folder: pass it as the LLM \\(llm, --llm\\)"):
        CLIP.from_pretrained(str(tmp_path))
