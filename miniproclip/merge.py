"""Stage 0's output: the LoRA adapters folded into the base LLM folder's own weights, written as a complete Hugging
Face folder (config, tokenizer files, `model.safetensors` or shards with the HF key names) that `--llm` accepts
everywhere and transformers loads, as LLM2CLIP publishes its merged caption-contrastive LLM.
"""

import json
import os
import shutil
from dataclasses import asdict

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .files import atomic_folder
from .llm import DecoderLM
from .lora import LoRALinear, LoRASettings, lora_state_dict
from .weights import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, folder_fingerprint, tensors_digest, weight_files

MAX_SHARD_BYTES = 5 * 2**30  # shard size of the merged folder, as transformers' save_pretrained


def adapter_digest(model: nn.Module, lora: LoRASettings) -> str:
    """A hash of the adapters' weights and settings, stored in the merged folder's safetensors metadata."""
    return tensors_digest(sorted(lora_state_dict(model).items()), salt=json.dumps(asdict(lora), sort_keys=True))


def write_merged_llm(model: DecoderLM, base: str, output: str, lora: LoRASettings,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Write `output`: a complete HF folder of the base with the adapters of `model` folded in (the base's config,
    tokenizer and other small files; its weights in their stored dtype and key names, each adapted one as
    W + (alpha/r) B A summed in fp32, sharded above `max_shard_bytes`). The weights are the base folder's, not the
    model's, so a base trained in bf16 loses no precision and every tensor LoRA leaves alone is copied bit for bit.
    The safetensors metadata names the base's fingerprint and the adapters' digest, so `folder_fingerprint` tells
    the folder from its base. Written beside `output` and renamed into place (files.atomic_folder)."""
    metadata = {"format": "pt", "miniproclip_stage0": json.dumps(
        {"base_fingerprint": folder_fingerprint(base), "adapters": adapter_digest(model, lora)})}
    prefix = _stored_prefix(base)
    adapters = {prefix + name + ".weight": module for name, module in model.named_modules()
                if isinstance(module, LoRALinear)}  # keyed as the base stores the weights they adapt
    tensors = {}
    for path in weight_files(base):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                stored = f.get_tensor(key)
                tensors[key] = adapters[key].merged_weight(stored) if key in adapters else stored
    with atomic_folder(output) as tmp:  # a previous export is replaced only once the new one is complete
        for name in os.listdir(base):  # config.json, tokenizer.json, tokenizer_config.json, generation_config.json
            is_weights = name == INDEX_FILE or name.endswith((".safetensors",) + PICKLE_SUFFIXES)
            if os.path.isfile(os.path.join(base, name)) and not is_weights:
                shutil.copy2(os.path.join(base, name), os.path.join(tmp, name))
        _save_shards(tensors, tmp, metadata, max_shard_bytes)
    return output


def _stored_prefix(base: str) -> str:
    """The key prefix of the base folder's LLM body: "model." for *ForCausalLM folders, "" for base models."""
    for path in weight_files(base):
        with safe_open(path, framework="pt") as f:
            if any(k.startswith("model.") for k in f.keys()):
                return "model."
    return ""


def _save_shards(tensors: dict[str, torch.Tensor], folder: str, metadata: dict, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors + the index when over `max_shard_bytes`."""
    shards, size = [{}], 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key], size = tensor.contiguous(), size + nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SINGLE_FILE), metadata=metadata)
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
