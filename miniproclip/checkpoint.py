"""Training checkpoints: crash-safe saving, `--resume` resolution, loading that never runs code.

Mirrors karpathy/nanochat `checkpoint_manager.py` (weights + readable JSON meta per step, `_orig_mod.` stripped on
load) and open_clip's `--resume latest`, except that weights are safetensors and the training state loads with
`torch.load(weights_only=True)` (no file can run code), and that files are fsynced under temp names and renamed
before `latest` moves (a kill -9 or a full disk at any moment leaves the previous checkpoint usable). A run folder:
    meta.json                  run-level meta: stage, step, the run's config by named section (write_run_meta)
    metrics.jsonl              one JSON record per line, appended by the trainer (append_metrics)
    step_000120.safetensors    trainable weights; the header's metadata holds {"meta": json}
    step_000120.state.pt       optimizer / scheduler / GradScaler state, RNG states, data cursor, counters
    step_000120.json           the same meta as the weights header, readable
    latest                     one line naming the newest complete checkpoint: "step_000120"
"""

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .embedder import EmbedSettings
from .errors import UserError
from .files import TMP, fsync_path, write_text_atomic
from .weights import PICKLE_SUFFIXES, load_state_dict_strict

logger = logging.getLogger(__name__)

LATEST = "latest"
STEM = "step_{:06d}"  # a checkpoint's files are STEM + each of SUFFIXES
SUFFIXES = (".state.pt", ".json", ".safetensors")  # write order: the weights last
STEP_FILE = re.compile(r"^step_(\d+)(\.state\.pt|\.json|\.safetensors)$")
STALE_TEMP = re.compile(r"^(step_\d+(\.state\.pt|\.json|\.safetensors)|latest|meta\.json)\.tmp$")
WRAPPER_PREFIXES = ("module", "_orig_mod")  # added by DistributedDataParallel and torch.compile
PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple, torch.Size)  # exact types torch's weights_only loader takes
PLAIN_LEAVES = (torch.Tensor, torch.nn.Parameter, int, float, str, bool, type(None), torch.dtype, torch.device)


class CheckpointError(UserError, OSError):
    """A checkpoint that cannot be saved or loaded as asked; the message is one line saying why and what to do."""


def _remove(paths) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.remove(path)


def _jsonable(value):  # json.dumps fallback: tensors become numbers/lists, anything else (paths, dtypes) its str
    return value.tolist() if isinstance(value, torch.Tensor) else str(value)


def _check_plain(value, where: str) -> None:
    """Raise TypeError naming the first entry of `value` that torch.load(weights_only=True) would refuse."""
    if type(value) in PLAIN_CONTAINERS:
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) not in PLAIN_LEAVES:
        raise TypeError(f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) refuses; "
                        f"store only tensors, numbers, strings, None, lists, tuples and dicts")


def rng_state() -> dict:
    """Every RNG the trainer draws from, as plain data that loads with weights_only=True."""
    # python's state is already plain: (version, tuple of 625 ints, gauss_next float | None)
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one uint8 tensor per visible device
    return state


def set_rng_state(state: dict) -> None:
    """Restore the RNGs saved by rng_state(); CUDA states are set for the devices this machine has."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def check_writable(run_dir: str, need_bytes: int = 0) -> None:
    """Fail at startup, not at the first checkpoint: create `run_dir`, write a probe file, check free space."""
    probe = os.path.join(run_dir, f".write_probe_{os.getpid()}")
    try:
        os.makedirs(run_dir, exist_ok=True)
        Path(probe).write_text("ok")
        os.remove(probe)
        free = shutil.disk_usage(run_dir).free
    except OSError as err:
        raise CheckpointError(f"run folder (output, --output) {run_dir} is not writable: {err.strerror or err}; "
                              f"choose a folder you can write to") from None
    if free < need_bytes:
        raise CheckpointError(f"run folder (output, --output) {run_dir} has {free / 1e9:.2f} GB free, "
                              f"a checkpoint needs "
                              f"~{need_bytes / 1e9:.2f} GB; free some space or choose another output folder")


def save_checkpoint(run_dir: str, step: int, weights: dict[str, torch.Tensor], train_state: dict, meta: dict,
                    keep: int | None = None) -> str:
    """Write step_NNNNNN.{state.pt,json,safetensors} (fsynced temp files, then renames), then point `latest` at
    them; returns the weights path. `keep=N` deletes all but the newest N complete checkpoints and `latest`'s."""
    _check_plain(train_state, "train_state")
    stem = os.path.join(run_dir, STEM.format(step))
    # own, dense CPU copies: safetensors refuses tensors that share storage (tied or sliced weights)
    tensors = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in weights.items()}
    meta_text = json.dumps(meta, indent=2, default=_jsonable)
    writers = {".state.pt": lambda path: torch.save(train_state, path),
               ".json": lambda path: Path(path).write_text(meta_text, encoding="utf-8"),
               ".safetensors": lambda path: save_file(tensors, path, metadata={"meta": meta_text})}
    renamed = []
    try:
        os.makedirs(run_dir, exist_ok=True)
        _remove(os.path.join(run_dir, n) for n in os.listdir(run_dir) if STALE_TEMP.match(n))  # left by crashes
        for suffix in SUFFIXES:
            writers[suffix](stem + suffix + TMP)
            fsync_path(stem + suffix + TMP)
        for suffix in SUFFIXES:
            os.replace(stem + suffix + TMP, stem + suffix)
            renamed.append(stem + suffix)
        fsync_path(run_dir)
        write_text_atomic(os.path.join(run_dir, LATEST), os.path.basename(stem) + "\n")
    except BaseException as err:
        _remove([stem + suffix + TMP for suffix in SUFFIXES] + renamed + [os.path.join(run_dir, LATEST + TMP)])
        if isinstance(err, OSError):
            raise CheckpointError(f"cannot save {os.path.basename(stem)} in {run_dir}: {err.strerror or err}; "
                                  "the previous checkpoint is kept; free space or choose another output "
                                  "folder") from err
        raise
    if keep is not None:
        _prune(run_dir, keep)
    return stem + ".safetensors"


def _checkpoints(run_dir: str) -> tuple[dict[int, set[str]], list[int], int | None]:
    """({step: its checkpoint suffixes present}, the complete steps ascending, the step `latest` names or None)."""
    found = {}
    for match in filter(None, map(STEP_FILE.match, os.listdir(run_dir))):
        found.setdefault(int(match.group(1)), set()).add(match.group(2))
    try:
        named = re.fullmatch(r"step_(\d+)", Path(run_dir, LATEST).read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):  # missing or garbled
        named = None
    complete = sorted(step for step, suffixes in found.items() if len(suffixes) == len(SUFFIXES))
    return found, complete, int(named.group(1)) if named else None


def _prune(run_dir: str, keep: int) -> None:
    """Delete every checkpoint (complete or not) but the newest `keep` complete ones and the one `latest` names."""
    found, complete, named = _checkpoints(run_dir)
    for step in sorted(set(found) - set(complete[::-1][:keep]) - {named}):
        stem = os.path.join(run_dir, STEM.format(step))
        try:  # the weights first, so a half-deleted checkpoint is never taken for a complete one
            for suffix in [suffix for suffix in reversed(SUFFIXES) if suffix in found[step]]:
                os.remove(stem + suffix)
        except OSError as err:
            logger.warning(f"could not delete old checkpoint {stem}: {err.strerror or err}")


def append_metrics(run_dir: str, record: dict) -> None:
    """Append one JSON line to `run_dir`/metrics.jsonl (flushed as the file closes)."""
    with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=_jsonable) + "\n")


def write_run_meta(run_dir: str, meta: dict) -> None:
    """Atomically (re)write `run_dir`/meta.json."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        write_text_atomic(os.path.join(run_dir, "meta.json"), json.dumps(meta, indent=2, default=_jsonable) + "\n")
    except OSError as err:
        raise CheckpointError(f"cannot write meta.json in {run_dir}: {err.strerror or err}; "
                              f"free space or choose another output folder") from err


def latest_checkpoint(run_dir: str) -> str | None:
    """The weights path of the checkpoint `latest` names, else of the highest complete step, else None."""
    _, complete, step = _checkpoints(run_dir) if os.path.isdir(run_dir) else ({}, [], None)
    if step not in complete and complete:
        logger.warning(f"{run_dir}: '{LATEST}' is missing or does not name a complete checkpoint; "
                       f"using {STEM.format(complete[-1])}, the highest complete one")
        step = complete[-1]
    return os.path.join(run_dir, STEM.format(step)) + ".safetensors" if step in complete else None


def resolve_checkpoint(path: str) -> str:
    """The `.safetensors` path for a run folder (its latest checkpoint), a weights file or a step_NNNNNN stem."""
    if os.path.isdir(path):
        if (found := latest_checkpoint(path)) is None:
            raise CheckpointError(f"no checkpoint in {path}; give a run folder holding step_*.safetensors "
                                  f"(to resume (resume, --resume), start without it)")
        return found
    if path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path} is a pickle, which is never loaded as weights (it can run code); "
                              f"pass a step_NNNNNN.safetensors file or its run folder")
    weights = path if path.endswith(".safetensors") else path + ".safetensors"
    if not os.path.isfile(weights):
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run folder, a step_NNNNNN.safetensors file "
                              f"or its step_NNNNNN stem")
    return weights


def load_weights(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict on CPU, meta) of a checkpoint given as anything resolve_checkpoint accepts."""
    path = resolve_checkpoint(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:  # 'module._orig_mod.fc.weight' -> 'fc.weight'
            header = f.metadata() or {}
            state_dict = {".".join(p for p in key.split(".") if p not in WRAPPER_PREFIXES): f.get_tensor(key)
                          for key in f.keys()}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); "
                              f"pass another step_NNNNNN.safetensors or its run folder") from None
    return state_dict, json.loads(header.get("meta", "{}"))


def load_meta(path: str) -> dict:
    """The meta of a checkpoint (args, stage, head config, ...) without reading its tensors."""
    path = resolve_checkpoint(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); "
                              f"pass another step_NNNNNN.safetensors or its run folder") from None


# Runs saved before the config had sections hold a flat dictionary of train.py's flags, meta["args"] (and the head
# beside it, meta["head"]). The section each of those flags now lives in; the embedding and LoRA sections are
# built from their flags, flags of no section (e.g. given_flags) are dropped.
LEGACY_SECTIONS = {
    "run": ("stage", "init", "output", "seed", "save_every", "keep", "log_every", "eval_every", "max_bad_steps",
            "toy_dir", "device", "compile", "grad_checkpointing"),
    "models": ("clip", "llm", "lock_image_layers"),
    "data": ("train_data", "val_data", "text_cache", "csv_img_key", "csv_caption_key", "csv_separator",
             "strict_data", "workers", "train_crop", "long_prob"),
    "optimizer": ("batch_size", "accum_freq", "epochs", "max_steps", "lr", "lr_vision", "wd", "beta1", "beta2", "eps",
                  "warmup", "grad_clip_norm"),
    "loss": ("ins_weight", "struct_weight", "reg_weight", "reduction", "gather_with_grad", "local_loss", "reg_scope",
             "ema_momentum", "skip_truncated_long", "temperature"),
    "precision": ("precision", "llm_dtype", "batch_tokens"),
}


def config_sections(meta: dict) -> dict[str, dict]:
    """The run's config by section ({"run": {...}, "models": {...}, "embedding": {...}, "head": {...}, ...}) of a
    checkpoint's meta; a run saved with the flat flag dictionary (meta["args"]) is read into the same sections."""
    if "config" in meta:
        return meta["config"]
    args = meta["args"]  # KeyError: not a train.py meta (the callers say so)
    sections = {name: {key: args[key] for key in keys if key in args} for name, keys in LEGACY_SECTIONS.items()}
    if args.get("warmup", 0) is None:  # stage 0's "10% of the steps", filled in once the steps were counted
        sections["optimizer"].update(warmup=0, warmup_ratio=0.1)
    embedding = EmbedSettings.from_flags(args.get("embed_preset", "default"), args.get("max_length", 512),
                                         args.get("instruction", ""), args.get("append_eos", False),
                                         args.get("bidirectional", False))  # argparse's defaults where absent
    sections["embedding"] = embedding.__dict__
    if "lora_rank" in args:  # adapters as named on the command line: q -> q_proj
        targets = [t if t.endswith("_proj") else f"{t}_proj" for t in args["lora_targets"].split(",") if t]
        sections["lora"] = {"rank": args["lora_rank"], "alpha": args["lora_alpha"], "dropout": args["lora_dropout"],
                            "targets": targets}
    sections["head"] = meta.get("head")
    return sections


def load_train_state(path: str) -> dict:
    """The `.state.pt` next to a checkpoint's weights (or given itself), on CPU, with weights_only=True."""
    is_state = path.endswith(".state.pt")
    state_path = path if is_state else resolve_checkpoint(path).removesuffix(".safetensors") + ".state.pt"
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{state_path} does not exist; without it training cannot resume from "
                              f"this checkpoint (its weights alone can still be loaded)")
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # refused (UnpicklingError) or corrupt (RuntimeError, EOFError, IndexError, ...)
        # torch explains over several paragraphs: keep the diagnosis (the last line before the doc link)
        lines = [line for line in map(str.strip, str(err).splitlines()) if line and not line.startswith("Check the")]
        detail = (lines or [type(err).__name__])[-1].split(". ")[0].rstrip(".")
        raise CheckpointError(f"cannot load {state_path}: {detail}; resume from another step_NNNNNN (a training "
                              f"state may hold only tensors and plain data)") from None


def load_trained_weights(model: torch.nn.Module, path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Put a train.py checkpoint's weights into a ProCLIP `model`, strictly, wherever a checkpoint is loaded.

    A stage-1 checkpoint holds the text head only (`text_head.*`), a stage-2 one the whole model; an EMA
    teacher (`teacher.*`) is not part of the model and is returned for the caller that needs it (a resumed
    stage-2 run), with the checkpoint's meta: (teacher weights, possibly empty; meta).
    """
    state, meta = load_weights(path)
    teacher = {k.removeprefix("teacher."): v for k, v in state.items() if k.startswith("teacher.")}
    state = {k: v for k, v in state.items() if not k.startswith("teacher.")}
    if meta.get("stage") == 1:  # only the head was trained
        load_state_dict_strict(model.text_head, {k.removeprefix("text_head."): v for k, v in state.items()}, path)
    else:
        load_state_dict_strict(model, state, path)
    return teacher, meta
