"""LoRA: merged and unmerged models agree, only adapters train, adapter checkpoints round-trip."""

import pytest
import torch

from miniproclip.llm import DecoderLM, mean_pool
from miniproclip.lora import DEFAULT_TARGETS, LoRALinear, apply_lora, load_lora_state_dict, lora_state_dict, merge_lora

from fixtures import write_tiny_llm


@pytest.fixture
def tiny_model(tmp_path):
    pytest.importorskip("transformers")
    return DecoderLM.from_pretrained(write_tiny_llm(tmp_path / "llm"), causal=False)


def randomize_adapters(model, seed=1):
    """Non-zero B, so the adapters really change the outputs (a fresh adapter is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora_state_dict(model).items():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_fresh_adapter_changes_nothing_and_merged_equals_unmerged(tiny_model):
    ids = torch.randint(3, 64, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    before = tiny_model(ids, mask)
    wrapped = apply_lora(tiny_model, rank=4, alpha=8, dropout=0.0)
    assert len(wrapped) == 2 * len(DEFAULT_TARGETS)  # two layers, seven projections each
    assert torch.equal(tiny_model(ids, mask), before)  # B = 0 at the start
    randomize_adapters(tiny_model)
    adapted = tiny_model(ids, mask)
    assert (adapted - before).abs().max() > 1e-2  # the adapters do something
    keys = set(DecoderLM(tiny_model.config).state_dict())
    merge_lora(tiny_model)
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())
    assert set(tiny_model.state_dict()) == keys  # back to the HF parameter names
    torch.testing.assert_close(tiny_model(ids, mask), adapted, atol=2e-5, rtol=1e-4)


def test_merge_matches_hand_computed_weight():
    base = torch.nn.Linear(5, 3)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, rank=2, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = original + 3.0 * layer.lora_B @ layer.lora_A  # alpha / rank = 3
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), x @ expected.T + base.bias)
    torch.testing.assert_close(layer.merged().weight, expected)


def test_forward_is_w_x_plus_scaled_b_a_x_in_each_precision():
    """y = W x + b + (alpha/r) B A x: fp32; a bf16 base without autocast (the adapter in fp32, cast to bf16 at the
    end); under bf16 autocast (everything in bf16): each within its dtype's rounding of the fp32 formula."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24)
    layer = LoRALinear(base, rank=4, alpha=12.0)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 32)
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ layer.lora_A.T) @ layer.lora_B.T  # alpha/r = 3
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
    layer.base.to(torch.bfloat16)
    out = layer(x.bfloat16())  # no autocast: the fp32 adapter takes the bf16 input cast up, the sum is bf16
    assert out.dtype == torch.bfloat16 and (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_only_adapters_get_gradients(tiny_model):
    apply_lora(tiny_model, rank=2, alpha=4, targets=("q_proj", "v_proj", "down_proj"))
    randomize_adapters(tiny_model)
    ids = torch.randint(3, 64, (2, 5))
    mean_pool(tiny_model(ids), torch.ones(2, 5)).square().sum().backward()
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in tiny_model.named_parameters() if p.grad is not None}
    assert trainable == with_grad == set(lora_state_dict(tiny_model))
    assert len(trainable) == 2 * 3 * 2  # layers x targets x (A, B)
    assert all(tiny_model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


def test_lora_checkpoint_round_trip(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file
    apply_lora(tiny_model, rank=2, alpha=4)
    randomize_adapters(tiny_model, seed=3)
    save_file(lora_state_dict(tiny_model), tmp_path / "lora.safetensors")
    assert all(".lora_" in key for key in load_file(tmp_path / "lora.safetensors"))
    other = DecoderLM.from_pretrained(str(tmp_path / "llm"), causal=False)  # as the fixture
    apply_lora(other, rank=2, alpha=4)
    load_lora_state_dict(other, load_file(tmp_path / "lora.safetensors"))
    ids = torch.randint(3, 64, (2, 6))
    torch.testing.assert_close(other(ids), tiny_model(ids), atol=0, rtol=0)
    wrong_rank = DecoderLM.from_pretrained(str(tmp_path / "llm"))
    apply_lora(wrong_rank, rank=3, alpha=4)
    with pytest.raises(ValueError, match="was the rank the same"):
        load_lora_state_dict(wrong_rank, load_file(tmp_path / "lora.safetensors"))


def test_unknown_target_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="no nn.Linear named qproj"):
        apply_lora(tiny_model, targets=("qproj",))
