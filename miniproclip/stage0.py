"""Stage 0: LLM2CLIP's caption-contrastive fine-tuning of the LLM embedder, with LoRA, then a merged HF folder.

LLM2CLIP (arXiv 2411.04997, sec. 3; `llm_caption_contrastive/run_supervised.py`, LLM2Vec's supervised SimCSE)
turns a decoder LLM into a caption embedder: texts that mean the same thing (captions of one image, a caption and
its long version or translation) are positives, the other groups' texts in the batch are negatives. Here:
- data: JSONL rows {"texts": [...]} (any two texts of a row mean the same), or the image-caption rows of stages
  1-2 (`caption` with `long_caption` form a group); each step takes two texts per group, chosen by a seeded
  generator keyed by (seed, epoch, row), so the choice does not depend on the batch or the rank layout;
- loss: symmetric InfoNCE over in-batch negatives, `(CE(S/τ, I) + CE(Sᵀ/τ, I)) / 2` with S the cosine
  similarities of the two texts' pooled embeddings, computed exactly as `embedder.LLMEmbedder` does (same
  tokenization, prefix/suffix, attention mode and mean pool). LLM2Vec's `HardNegativeNLLLoss` is the one-way
  half with scale 50 (τ = 0.02, LLM2CLIP's config); gathering across ranks is `losses.ClipLoss`'s;
- LoRA (lora.py) on the frozen LLM, r=16, alpha=32, dropout 0.05 on q, k, v, o, gate, up, down by default;
- output: the adapters merged into the weights and written as a complete HF folder (config, tokenizer files,
  `model.safetensors` with the HF key names), usable as `--llm` everywhere and by transformers;
- `python train.py --stage 0`: its flags, defaults, model and the `Stage0` object that train.py's loop runs like
  stages 1-2 (the last section; checkpoints hold the adapters only).
"""

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch.nn.attention import SDPBackend, sdpa_kernel
from safetensors.torch import save_file

from .checkpoint import load_weights
from .data import MAX_WARNINGS, DataError, _clean_text, _Malformed, _Skipper, expand_braces, jsonl_records, read_rows
from .embedder import CaptionTokenizer, EmbedSettings, default_batch_tokens, folder_fingerprint, pad_batch, \
    token_budget_batches
from .errors import TrainingError
from .files import TMP
from .llm import DecoderLM, mean_pool
from .lora import DEFAULT_TARGETS, LoRALinear, apply_lora, load_lora_state_dict, lora_state_dict
from .losses import ClipLoss
from .stages import AUTOCAST
from .weights import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, weight_files

MAX_SHARD_BYTES = 5 * 2**30  # shard size of the merged folder, as transformers' save_pretrained
LLM2CLIP_LR = 2e-4  # LLM2CLIP's caption-contrastive recipe; also the toy world's (toy/groups.py says why)
LLM2CLIP_TEMPERATURE = 0.02  # LLM2CLIP's logit scale 50
TOY_TEMPERATURE = 0.05  # the toy world's groups and paraphrase demo (toy/groups.py)


# -----------------------------------------------------------------------------
# data: groups of texts that mean the same thing

def _group(record: dict) -> tuple[list[str], list[str] | None]:
    """The texts of one JSONL record, and their kinds when the record names them: {"texts": [...]} with an
    optional {"kinds": [...]} (e.g. ["short", "long", "de"]), or an image-caption row's caption and long caption."""
    if "texts" in record:
        if not isinstance(record["texts"], list):
            raise _Malformed(f'"texts" must be a list, got {type(record["texts"]).__name__}')
        texts = [_clean_text(t, "texts", required=True) for t in record["texts"]]
    else:  # an image-caption row: the caption and its long version
        texts = [_clean_text(record.get(k), k, required=True) for k in ("caption", "long_caption")]
    kinds = record.get("kinds")
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != len(texts)):
        raise _Malformed('"kinds" must be a list with one kind per text')
    if len(set(texts)) < len(texts):  # a repeated text is no second view
        keep = [texts.index(t) for t in dict.fromkeys(texts)]
        texts, kinds = [texts[i] for i in keep], kinds and [kinds[i] for i in keep]
    if len(texts) < 2:
        raise _Malformed("a group needs two different texts")
    return texts, kinds


@dataclass
class Groups:
    """Stage 0's data: groups of texts that mean the same thing, the first text of each its anchor."""
    texts: list[list[str]]
    sources: list[int]  # the file each group came from: a training batch holds one file's groups
    kinds: list[list[str]] | None  # each text's kind where every row names them (validation groups), else None

    def __len__(self) -> int:
        return len(self.texts)


def read_groups(source: str, strict: bool = False, log=print) -> Groups:
    """Every group of `source` (paths joined by "::", brace patterns allowed). A .jsonl file holds rows
    {"texts": [...]} (optionally with "kinds") or image-caption rows {"caption", "long_caption"}; .csv/.tsv/.tar
    image-caption sources are read by `data.read_rows` and give a group per row with a long caption. Malformed
    rows are skipped with a count (or raise DataError when `strict`), as in stages 1-2."""
    skip, groups, sources, kinds = _Skipper(strict, log), [], [], []
    for part in source.split("::"):
        for path in expand_braces(part):
            if not os.path.isfile(path):
                raise DataError(f"{path} does not exist: check the data path {source!r}")
            skipped_before = skip.count
            if path.lower().endswith(".jsonl"):
                file_groups = list(jsonl_records(path, skip, _group))
            else:
                rows = read_rows(path, strict=strict, log=log)
                file_groups = [([r.caption, r.long_caption], None) for r in rows if r.long_caption]
                if len(file_groups) < len(rows):
                    log(f"warning: {path}: {len(rows) - len(file_groups)} rows without a long caption skipped "
                        "(a group needs two texts)")
            if not file_groups:
                raise DataError(f"{path}: no valid groups ({skip.count - skipped_before} malformed skipped): "
                                'expected JSONL rows {"texts": [...]} or rows with caption and long_caption')
            sources += [len(set(sources))] * len(file_groups)
            groups += [texts for texts, _ in file_groups]
            kinds += [group_kinds for _, group_kinds in file_groups]
    if skip.count:
        shown = f", the first {MAX_WARNINGS} shown above" if skip.count > MAX_WARNINGS else ""
        log(f"warning: skipped {skip.count} malformed rows in {source}{shown}")
    return Groups(groups, sources, kinds if all(k is not None for k in kinds) else None)


def pick_pairs(groups: list[list[str]], indices: list[int], seed: int, epoch: int) -> list[tuple[str, str]]:
    """(anchor, positive) of each group `indices[i]`: its first text and one of the others, drawn by a generator
    keyed by (seed, epoch, group index), so the draw does not depend on the batch or the rank layout.

    LLM2CLIP/LLM2Vec pair a query with a positive of the other kind (a short caption with its long version or a
    translation). Pairs of any two texts of a group collapse on the toy world: two translations of one scene are
    no closer to each other in raw SmolLM2 than to other scenes' texts of their languages, and making every
    embedding equal is the loss's fastest way down, where every gradient vanishes (RESULTS.md, "Stage 0")."""
    pairs = []
    for index in indices:
        group = groups[index]
        positive = 1 + int(np.random.default_rng([seed, epoch, index]).integers(len(group) - 1))
        pairs.append((group[0], group[positive]))
    return pairs


def anchor_recall(embed, groups: list[list[str]], kinds: list[list[str]] | None = None) -> dict[str, float]:
    """Held-out groups: for every text after a group's first (its anchor), is its own anchor the most cosine-
    similar of all the groups' anchors? The share, per kind of text (`kinds[g][i]` names text i of group g, e.g.
    "long", "de"; default: its position in the group). `embed(texts)` -> (N, C) embeddings."""
    anchors = F.normalize(embed([g[0] for g in groups]).float(), dim=-1)  # (G, C)
    queries = [(g, kinds[g][i] if kinds else str(i)) for g, group in enumerate(groups) for i in range(1, len(group))]
    texts = [groups[g][i] for g, group in enumerate(groups) for i in range(1, len(group))]
    nearest = (F.normalize(embed(texts).float(), dim=-1) @ anchors.T).argmax(1).tolist()  # (Q,) anchor index
    hits = {}
    for (g, kind), found in zip(queries, nearest):
        hits.setdefault(kind, []).append(found == g)
    return {kind: sum(found) / len(found) for kind, found in hits.items()}


# -----------------------------------------------------------------------------
# the model and the stage

@dataclass
class LoRASettings:
    rank: int = 16  # LLM2CLIP/LLM2Vec: lora_r 16
    alpha: float = 32.0  # LLM2Vec's run_supervised.py: lora_alpha = 2 * lora_r
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS


def load_stage0_llm(folder: str, settings: EmbedSettings, lora: LoRASettings, dtype: torch.dtype = torch.float32,
                    device: str = "cpu", grad_checkpointing: bool = False) -> DecoderLM:
    """The frozen LLM of `folder` (weights in `dtype`) with fp32 LoRA adapters, in train mode."""
    model = DecoderLM.from_pretrained(folder, dtype=dtype, device=device, causal=settings.causal)
    model.grad_checkpointing = grad_checkpointing
    apply_lora(model.train(), lora.rank, lora.alpha, lora.dropout, tuple(lora.targets))
    return model


def attention_for_training(device) -> contextlib.AbstractContextManager:
    """SDPA's math kernel (matmul, softmax, matmul) while training on a CPU, where the fused CPU kernel's backward
    is the slowest part of a step at caption lengths (bench/train_step.py: a SmolLM2 + LoRA step on 2 cores,
    7.7x faster in fp32 and 1.3x in bf16). The kernel is chosen in the forward; the backward follows it."""
    cpu_training = torch.device(device).type == "cpu" and torch.is_grad_enabled()
    return sdpa_kernel(SDPBackend.MATH) if cpu_training else contextlib.nullcontext()


class CaptionContrastive:
    """Stage 0 in the shape of the other stages: `features(micro_batch)` and `loss(features)`, so that
    contrastive-aware accumulation (stages.accumulated_backward) splices micro-batches as in stage 2.

    A micro-batch is a list of (text, text) pairs; `model` may be the DDP-wrapped LLM.
    """

    def __init__(self, model: nn.Module, tokenize: CaptionTokenizer, temperature: float = LLM2CLIP_TEMPERATURE,
                 gather_with_grad: bool = False, rank: int = 0, world_size: int = 1, device: str = "cpu",
                 autocast=contextlib.nullcontext(), batch_tokens: int = 1024):
        if temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {temperature}")
        self.model, self.tokenize, self.temperature, self.device = model, tokenize, temperature, device
        self.autocast = autocast  # bf16/fp16 autocast of the LLM's forward; pooling and loss stay fp32
        self.batch_tokens = batch_tokens  # padded tokens per forward on one process (see `features`)
        self.clip_loss = ClipLoss(gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N, C) L2-normalised pooled embeddings (fp32), computed as `embedder.LLMEmbedder` computes them.

        On one process the texts run in length-sorted batches of at most `batch_tokens` padded tokens, so a long
        caption does not pad every short one to its length; mean pooling makes each text's embedding independent
        of its batch. DDP allows one forward per backward, so under torchrun they run as one padded batch."""
        ids, _ = self.tokenize(texts)
        single = self.clip_loss.world_size == 1 or not torch.is_grad_enabled()
        batches = token_budget_batches([len(row) for row in ids], self.batch_tokens) if single else [range(len(ids))]
        pooled = [None] * len(ids)
        for batch in batches:
            padded = pad_batch([ids[i] for i in batch], len(self.tokenize.prefix))
            input_ids, attention, pool = (t.to(self.device) for t in padded)
            with self.autocast, attention_for_training(self.device):
                hidden = self.model(input_ids, attention)  # (b, T, C)
            for i, vector in zip(batch, F.normalize(mean_pool(hidden, pool), dim=-1)):  # (b, C) fp32
                pooled[i] = vector
        return torch.stack(pooled)  # (N, C) in input order

    def features(self, pairs: list[tuple[str, str]], student_only: bool = False) -> dict[str, torch.Tensor]:
        """{"a": (B, C), "b": (B, C)}: the embeddings of each pair's anchor and positive."""
        pooled = self.embed([a for a, _ in pairs] + [b for _, b in pairs])  # (2B, C)
        return {"a": pooled[:len(pairs)], "b": pooled[len(pairs):]}

    def loss(self, features: dict[str, torch.Tensor], last: bool = True) -> tuple[torch.Tensor, dict]:
        """Symmetric InfoNCE with logits cos/τ; under torchrun over the global batch (ClipLoss gathers)."""
        loss = self.clip_loss(features["a"], features["b"], torch.tensor(1.0 / self.temperature))
        return loss, {"contrastive": loss.detach()}


def nearest_neighbour_accuracy(embeddings: torch.Tensor, group_ids: list[int]) -> float:
    """Share of texts whose most cosine-similar other text belongs to the same group (held-out paraphrases)."""
    x = F.normalize(embeddings.float(), dim=-1)
    similarity = (x @ x.T).fill_diagonal_(-float("inf"))  # (N, N), a text is not its own neighbour
    groups = torch.tensor(group_ids)
    return (groups[similarity.argmax(1)] == groups).float().mean().item()


# -----------------------------------------------------------------------------
# the merged Hugging Face folder

def adapter_digest(model: nn.Module, lora: LoRASettings) -> str:
    """A hash of the adapters' weights and settings, stored in the merged folder's safetensors metadata."""
    digest = hashlib.sha256(json.dumps(asdict(lora), sort_keys=True).encode())
    for name, tensor in sorted(lora_state_dict(model).items()):
        digest.update(name.encode() + tensor.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def write_merged_llm(model: DecoderLM, base: str, output: str, lora: LoRASettings,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Write `output`: a complete HF folder of the base with the adapters of `model` folded in (the base's config,
    tokenizer and other small files; its weights in their stored dtype and key names, each adapted one as
    W + (alpha/r) B A summed in fp32, sharded above `max_shard_bytes`). The weights are the base folder's, not the
    model's, so a base trained in bf16 loses no precision and every tensor LoRA leaves alone is copied bit for bit.
    The safetensors metadata names the base's fingerprint and the adapters' digest, so `folder_fingerprint` tells
    the folder from its base. Written beside `output` and renamed into place."""
    metadata = {"format": "pt", "miniproclip_stage0": json.dumps(
        {"base_fingerprint": folder_fingerprint(base), "adapters": adapter_digest(model, lora)})}
    prefix = _stored_prefix(base)
    deltas = {prefix + name + ".weight": module.delta() for name, module in model.named_modules()
              if isinstance(module, LoRALinear)}  # (out, in) fp32 updates, keyed as the base stores the weights
    tensors = {}
    for path in weight_files(base):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                stored = f.get_tensor(key)
                tensors[key] = (stored.float() + deltas[key].cpu()).to(stored.dtype) if key in deltas else stored
    tmp = output.rstrip("/") + TMP
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(base):  # config.json, tokenizer.json, tokenizer_config.json, generation_config.json...
        is_weights = name == INDEX_FILE or name.endswith((".safetensors",) + PICKLE_SUFFIXES)
        if os.path.isfile(os.path.join(base, name)) and not is_weights:
            shutil.copy2(os.path.join(base, name), os.path.join(tmp, name))
    _save_shards(tensors, tmp, metadata, max_shard_bytes)
    if os.path.isdir(output):  # a previous export: replaced only once the new one is complete
        shutil.rmtree(output)
    os.replace(tmp, output)
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


# -----------------------------------------------------------------------------
# `python train.py --stage 0`: its flags, defaults, model and stage (train.py's loop runs it like stages 1-2)

def add_arguments(parser) -> None:
    g = parser.add_argument_group("stage 0 (caption-contrastive LoRA fine-tuning of the LLM, LLM2CLIP)")
    g.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (LLM2CLIP: 16)")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha; the update is scaled by alpha/r")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                   help="comma-separated projections that get adapters (q = q_proj, ...)")
    g.add_argument("--temperature", type=float, default=None,
                   help="InfoNCE temperature (default: 0.02, LLM2CLIP's scale 50; 0.05 on the toy groups)")


def lora_settings(args) -> LoRASettings:
    targets = tuple(t if t.endswith("_proj") else f"{t}_proj" for t in args.lora_targets.split(",") if t)
    return LoRASettings(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)


# LLM2Vec's optimizer (HF Trainer's AdamW defaults, weight decay 0), where the flags' defaults are CLIP's
STAGE0_OPTIMIZER = {"wd": 0.0, "beta2": 0.999, "eps": 1e-8}
# The toy world's recipe, chosen on its validation groups (RESULTS.md, "Stage 0"): a faster rate than LLM2CLIP's,
# which starts from an embedder already trained, and no adapter dropout; TOY_STEPS batches of TOY_BATCH pairs
TOY_RECIPE = {"lr": 1e-3, "lora_dropout": 0.0, "batch_size": 32, "max_steps": 120, "temperature": TOY_TEMPERATURE}


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 runs several times faster."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fill_defaults(args, resumed_meta: dict | None, log) -> None:
    """Stage 0's LLM, data and rates: LLM2CLIP's recipe (lr 2e-4, temperature 0.02, LoRA dropout 0.05, 1 epoch,
    warmup 10% of the steps) and LLM2Vec's optimizer settings. Without --train-data: the toy world's pairs
    (toy/world.py, `stage0_sources`), its validation groups and SmolLM2, with TOY_RECIPE. bf16 autocast over a
    bf16 base (fp32 adapters) on GPUs and on CPUs with bf16 instructions. A resumed run keeps its own settings."""
    if resumed_meta and args.llm is None:
        args.llm = resumed_meta["args"]["llm"]
    toy = args.train_data is None
    if toy:
        from .toy.groups import toy_stage0_data
        args.train_data, toy_val, args.llm = toy_stage0_data(args.toy_dir, args.llm, log)
        args.val_data = args.val_data or toy_val
    if args.llm is None:
        raise TrainingError("--stage 0 needs --llm LLM_DIR, the Hugging Face LLM to fine-tune")
    if args.init:
        raise TrainingError("--init is for stage 2; stage 0 starts from --llm (continue a run with --resume)")
    if not resumed_meta:  # the flags not typed take stage 0's defaults (a resumed run inherited its own)
        for key, value in {**STAGE0_OPTIMIZER, **(TOY_RECIPE if toy else {})}.items():
            if key not in args.given_flags:
                setattr(args, key, value)
        if "warmup" not in args.given_flags:
            args.warmup = None  # 10% of the steps, set once they are counted (train.setup_stage0)
    args.epochs = args.epochs or 1
    args.lr = args.lr if args.lr is not None else LLM2CLIP_LR
    args.temperature = args.temperature if args.temperature is not None else (
        TOY_TEMPERATURE if toy else LLM2CLIP_TEMPERATURE)
    cpu_bf16 = args.device == "cpu" and cpu_has_bf16()
    args.precision = args.precision or ("amp_bf16" if args.device.startswith("cuda") or cpu_bf16 else "fp32")
    args.workers = 0  # the texts are in memory: no loader processes


class GroupDataset(torch.utils.data.Dataset):
    """Group indices for train.py's loader (loader.collate's fields); the texts are drawn in `Stage0.prepare`."""

    def __init__(self, groups: Groups):
        self.groups = groups.texts

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "pixels": None, "caption": self.groups[index][0], "long_caption": None}


class Stage0(CaptionContrastive):
    """CaptionContrastive in the training loop's stage interface: a batch of groups -> (anchor, positive) pairs."""
    teacher_truncated = teacher_unknown = 0  # no teacher in stage 0 (fields of the loop's log records)

    def __init__(self, groups: Groups, seed: int, cursor, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups, self.seed, self.cursor = groups.texts, seed, cursor  # the cursor's epoch keys the draw

    def prepare(self, batch: dict, pick_long) -> dict:
        pairs = pick_pairs(self.groups, batch["indices"], self.seed, self.cursor.epoch)
        return {"captions": batch["captions"], "pairs": pairs}  # "captions": the loop counts and splits by them

    def features(self, micro_batch: dict, student_only: bool = False) -> dict[str, torch.Tensor]:
        return super().features(micro_batch["pairs"], student_only)

    def after_step(self) -> None:
        pass  # only the adapters change, by the optimizer


def setup_model(args, settings: EmbedSettings, device: torch.device, resume_path: str | None, log):
    """(the LLM with LoRA adapters, the groups). The frozen base is bf16 under --precision amp_bf16, else fp32; the
    adapters are fp32. A resumed run's adapters come from its checkpoint (which holds only them)."""
    groups = read_groups(args.train_data, strict=args.strict_data, log=log)
    dtype = torch.bfloat16 if args.precision == "amp_bf16" else torch.float32
    lora = lora_settings(args)
    model = load_stage0_llm(args.llm, settings, lora, dtype, str(device), args.grad_checkpointing)
    adapted = {name.split(".")[-2] for name in lora_state_dict(model)}  # "layers.0.self_attn.q_proj.lora_A" -> q_proj
    missing = set(lora.targets) - adapted
    if missing:  # a typo would silently leave those layers untrained
        raise TrainingError(f"--lora-targets: {args.llm} has no {', '.join(sorted(missing))} layers")
    if resume_path:
        load_lora_state_dict(model, load_weights(resume_path)[0])
    log(f"stage 0: {len(groups)} groups in {len(set(groups.sources))} source(s) from {args.train_data}, LLM "
        f"{args.llm} ({dtype}), LoRA r {args.lora_rank} on {args.lora_targets}")
    return model, groups


def build_stage(args, model, groups, settings, cursor, device, rank, world):
    """The stage object and DDP's no_sync for the loop; DDP and torch.compile wrap the forward passes only."""
    forward = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    no_sync = forward.no_sync if world > 1 else contextlib.nullcontext
    forward = torch.compile(forward, dynamic=True) if args.compile else forward  # text lengths vary
    autocast = torch.autocast(device.type, dtype=AUTOCAST.get(args.precision, torch.float32),
                              enabled=args.precision != "fp32")
    stage = Stage0(groups, args.seed, cursor, forward, CaptionTokenizer(args.llm, settings), args.temperature,
                   args.gather_with_grad, rank, world, device, autocast,
                   args.batch_tokens or default_batch_tokens(device.type))
    return stage, no_sync


@torch.no_grad()
def validate(args, stage: CaptionContrastive, model: nn.Module, log) -> dict[str, float]:
    """`anchor_recall` on the --val-data groups with the model as trained (adapters not yet merged), logged and
    returned as {"val/<kind>": share}; {} without --val-data."""
    if not args.val_data:
        return {}
    groups = read_groups(args.val_data, log=log)
    model.eval()
    recall = anchor_recall(stage.embed, groups.texts, groups.kinds)
    model.train()
    log(f"stage 0 validation ({len(groups)} groups of {args.val_data}): each text's own anchor is its nearest of "
        f"the {len(groups)} anchors for " + ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in recall.items()))
    return {f"val/{kind}": share for kind, share in recall.items()}


def finish(args, model: nn.Module, log) -> str:
    """Merge the adapters into `model` and write RUN/llm (a Hugging Face folder); returns the next command."""
    folder = write_merged_llm(model, args.llm, os.path.join(args.output, "llm"), lora_settings(args))
    log(f"merged LLM (adapters folded into the weights): {folder}")
    flags = [f"--embed-preset {args.embed_preset}"] * (args.embed_preset != "default") + \
        ["--bidirectional"] * args.bidirectional + [f"--instruction {args.instruction!r}"] * bool(args.instruction)
    return " ".join(["python train.py --stage 1 --llm", folder, *flags])  # embedded as stage 0 trained it
