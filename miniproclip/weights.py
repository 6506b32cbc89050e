"""Reading Hugging Face model folders: `config.json` and safetensors weights, loaded strictly.

A model folder as the hub ships it holds `config.json` and either one `model.safetensors` or shards listed in
`model.safetensors.index.json` (`{"weight_map": {key: shard_file}}`). Only safetensors are read: `.bin`/`.pt`
files are pickles that can run code when unpickled, so they are refused with a hint on converting them.

Parameter names in miniproclip match the HF checkpoints, so loading is a plain strict `load_state_dict`; the
only thing done to the keys is dropping a prefix the caller names (e.g. `model.` of a `*ForCausalLM` folder).
Every user error is a `ModelFolderError` whose message is one line naming the folder and what to do.
"""

import hashlib
import json
import os

import torch
from safetensors import safe_open

from .errors import UserError


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
OPEN_CLIP_CONFIG = "open_clip_config.json"  # an open_clip hub folder (openclip.py maps its weights)
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")  # open_clip's order of preference


class ModelFolderError(UserError, ValueError):
    """A model folder or checkpoint that cannot be used as given; the message says why and what to do."""


def read_config(folder: str) -> dict:
    """The parsed `config.json` of an HF model folder."""
    if not os.path.isdir(folder):
        raise ModelFolderError(f"{folder}: not a folder; expected a Hugging Face model folder with config.json")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ModelFolderError(f"{folder}: no config.json; expected a Hugging Face model folder")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: not valid JSON ({err})") from None


def is_open_clip_folder(folder: str) -> bool:
    """An open_clip folder as the hub serves it: open_clip_config.json and no HF config.json (openclip.py)."""
    return (os.path.isfile(os.path.join(folder, OPEN_CLIP_CONFIG))
            and not os.path.isfile(os.path.join(folder, "config.json")))


def read_model_config(folder: str) -> dict:
    """`read_config`, or an open_clip folder's open_clip_config.json (to fingerprint either kind of folder)."""
    if is_open_clip_folder(folder):
        return read_open_clip_config(folder)
    return read_config(folder)


def model_weight_files(folder: str) -> list[str]:
    """`weight_files`, or an open_clip folder's one weights file (its safetensors, else its pickle)."""
    if is_open_clip_folder(folder):
        return [open_clip_weight_file(folder)]
    return weight_files(folder)


def weight_files(folder: str) -> list[str]:
    """The safetensors files holding a folder's weights, in shard order."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            shard_names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [name for name in shard_names if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise ModelFolderError(f"{folder}: shard {missing[0]} listed in {INDEX_FILE} is missing "
                                   f"({len(missing)} of {len(shard_names)} shards); download the whole folder")
        return [os.path.join(folder, name) for name in shard_names]
    if os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        return [os.path.join(folder, SINGLE_FILE)]
    singles = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if len(singles) == 1:  # e.g. a folder saved by another tool under another name
        return [os.path.join(folder, singles[0])]
    pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelFolderError(
            f"{folder}: only pickled weights ({pickles[0]}), which miniproclip never unpickles; convert them once "
            f"with transformers: `AutoModel.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`")
    raise ModelFolderError(f"{folder}: no weights found; expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


def load_safetensors_folder(folder: str, dtype: torch.dtype | None = None, device: str = "cpu",
                            ignore: tuple[str, ...] = (), rename=None) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors files (sharded or not), optionally cast to `dtype`.

    Keys ending with one of `ignore` are skipped (tensors the model recomputes, such as old `position_ids`);
    `rename(key)` gives the name a tensor is stored under, or None to leave it unread (e.g. `llm.decoder_key`).
    Floating-point tensors are cast; integer buffers keep their dtype.
    """
    state_dict = {}
    for path in weight_files(folder):
        with safe_open(path, framework="pt", device=device) as f:
            for key in f.keys():
                name = rename(key) if rename else key
                if name is None or key.endswith(ignore):
                    continue
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state_dict[name] = tensor
    return state_dict


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                           assign: bool = False, show: int = 5, remedy: str = "") -> None:
    """`module.load_state_dict(state_dict, strict=True)` with one readable error naming `source`.

    The error lists the first `show` missing, unexpected and wrong-shape keys, which is what one needs to
    tell a wrong folder (a CLIP given as LLM) from a wrong config (hidden size) from a truncated download.
    With `assign=True` the tensors become the parameters (used after building on the meta device); `remedy` ends
    the message with what to do.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)} expected"
                   for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
                parts.append(f"{len(keys)} {name}: {', '.join(keys[:show])}{more}")
        raise ModelFolderError(f"{source}: weights do not match the model built from its config; "
                               + "; ".join(parts) + (f"; {remedy}" if remedy else ""))
    module.load_state_dict(state_dict, strict=True, assign=assign)


def read_open_clip_config(folder: str) -> dict:
    """`open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...}) of an open_clip folder."""
    path = os.path.join(folder, OPEN_CLIP_CONFIG)
    if not os.path.isdir(folder):
        raise ModelFolderError(f"{folder}: not a folder; expected a Hugging Face CLIPModel folder (config.json) or "
                               f"an open_clip folder ({OPEN_CLIP_CONFIG})")
    if not os.path.isfile(path):
        raise ModelFolderError(f"{folder}: no config.json; expected a Hugging Face model folder (CLIPModel), or an "
                               f"open_clip folder with {OPEN_CLIP_CONFIG}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        return {"model_cfg": config["model_cfg"], "preprocess_cfg": config.get("preprocess_cfg") or {}}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelFolderError(f"{path}: not an open_clip config ({type(err).__name__}: {err}); download it "
                               f"again") from None


def open_clip_weight_file(folder: str) -> str:
    """The folder's open_clip weights: safetensors if present, else the pickle (read with weights_only)."""
    for name in OPEN_CLIP_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ModelFolderError(f"{folder}: {OPEN_CLIP_CONFIG} but no weights ({' or '.join(OPEN_CLIP_WEIGHTS[::2])}); download "
                           f"the whole folder")


# ----------------------------------------------------------------------------- identifying weights (cache keys)

def read_safetensors_header(f) -> tuple[bytes, int]:
    """(the JSON header's raw bytes, the offset where the data starts) of a safetensors file open in binary mode at
    its start: an 8-byte little-endian header length, then the header (tensor offsets and `__metadata__`)."""
    header_size = int.from_bytes(f.read(8), "little")
    return f.read(header_size), 8 + header_size


def tensors_digest(named_tensors, salt: str = "") -> str:
    """A digest of tensors themselves (each one's name, dtype, shape and raw bytes, in the order given), after
    `salt`: what identifies trained weights that have no file yet (a frozen teacher, stage 0's adapters)."""
    digest = hashlib.blake2b(salt.encode(), digest_size=8)
    for name, tensor in named_tensors:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    return digest.hexdigest()


def folder_fingerprint(folder: str) -> str:
    """Identifies a model folder's weights (an LLM, a CLIP), so a cache made by another model (or another
    fine-tune of it) is detected.

    Hashes config.json and, per weight file, its name, size, safetensors header and a strided sample of its data.
    Config and sizes alone do not tell a fine-tune from its base: a merged LoRA has the same config, keys, dtypes
    and file sizes. The header holds the metadata stage 0 writes (a hash of the merged adapters, exact); the
    sample (WEIGHT_SAMPLES chunks) catches other same-layout fine-tunes at a cost of a few MB read per file.
    """
    digest = hashlib.sha256(json.dumps(read_model_config(folder), sort_keys=True).encode())
    for path in model_weight_files(folder):
        digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)}".encode())
        digest.update(safetensors_content_sample(path))
    return digest.hexdigest()[:16]


WEIGHT_SAMPLES, SAMPLE_BYTES = 64, 65536  # evenly spaced chunks of each weight file that the fingerprint reads


def safetensors_content_sample(path: str) -> bytes:
    """The header (8-byte length + JSON, with `__metadata__`) and WEIGHT_SAMPLES chunks of the data section."""
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):
            header, data_start = read_safetensors_header(f)
            parts = [header]
        else:  # an open_clip .bin (a torch pickle, never unpickled here) has no header: the whole file is sampled
            parts, data_start = [], 0
        data_size = os.path.getsize(path) - data_start
        stride = max(data_size // WEIGHT_SAMPLES, SAMPLE_BYTES)
        for offset in range(0, data_size, stride):
            f.seek(data_start + offset)
            parts.append(f.read(SAMPLE_BYTES))
    return b"".join(parts)
