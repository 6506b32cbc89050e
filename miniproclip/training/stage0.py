"""Stage 0, `python train.py --stage 0`: LLM2CLIP's caption-contrastive LoRA fine-tune of the LLM embedder.

LLM2CLIP (arXiv 2411.04997, sec. 3; `llm_caption_contrastive/run_supervised.py`, LLM2Vec's supervised SimCSE)
turns a decoder LLM into a caption embedder: texts that mean the same thing are positives, the other groups'
texts in the batch negatives. Here, as a stage of the training loop (loop.py) (the protocol in stages.py):
- data: groups of texts (groups.py); each step pairs every group's anchor with one of its other texts, all of a
  batch's groups from one source file (LLM2Vec draws each batch from one dataset);
- loss: symmetric InfoNCE over in-batch negatives, `(CE(S/τ, I) + CE(Sᵀ/τ, I)) / 2` with S the cosine
  similarities of the pooled embeddings, computed exactly as `embedder.LLMEmbedder` does (one implementation,
  `embedder.pooled_embeddings`: same tokenization, prefix/suffix, attention mode and the preset's pooling, mean or
  last token). LLM2Vec's `HardNegativeNLLLoss` is the one-way half with scale 50
  (τ = 0.02, LLM2CLIP's config); gathering across ranks is `losses.ClipLoss`'s;
- LoRA (lora.py) on the frozen LLM, r=16, alpha=32, dropout 0.05 on q, k, v, o, gate, up, down by default;
  checkpoints hold the adapters only;
- the end of the run: the anchor recall of the --val-data groups, then the adapters merged into the base
  folder's weights (merge.py) as RUN/llm, usable as `--llm` everywhere and by transformers.
"""

import contextlib
import os
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_weights
from ..embedder import PRESETS, CaptionTokenizer, EmbedSettings, make_pool, pooled_embeddings
from ..errors import TrainingError
from ..groups import Groups, anchor_recall, pick_pairs, read_groups
from ..llm import DecoderLM
from ..lora import LoRASettings, apply_lora, load_lora_state_dict, lora_state_dict
from ..losses import ClipLoss
from ..merge import write_merged_llm
from ..precision import autocast, describe
from .stages import attention_for_training, wrap_forward

LLM2CLIP_LR = 2e-4  # LLM2CLIP's caption-contrastive recipe
LLM2CLIP_TEMPERATURE = 0.02  # LLM2CLIP's logit scale 50
STAGE0_OPTIMIZER = {"wd": 0.0, "beta2": 0.999, "eps": 1e-8}  # LLM2Vec's (HF Trainer's AdamW defaults, no decay)


# -----------------------------------------------------------------------------
# the model and the loss

def load_stage0_llm(folder: str, settings: EmbedSettings, lora: LoRASettings, dtype: torch.dtype = torch.float32,
                    device: str = "cpu", grad_checkpointing: bool = False) -> DecoderLM:
    """The frozen LLM of `folder` (weights in `dtype`) with fp32 LoRA adapters, in train mode."""
    model = DecoderLM.from_pretrained(folder, dtype=dtype, device=device, causal=settings.causal)
    model.grad_checkpointing = grad_checkpointing
    apply_lora(model.train(), lora.rank, lora.alpha, lora.dropout, tuple(lora.targets))
    return model


class CaptionContrastive:
    """Stage 0 in the shape of the other stages: `features(micro_batch)` and `loss(features)`, so that
    contrastive-aware accumulation (stages.accumulated_backward) splices micro-batches as in stage 2.

    A micro-batch is a list of (text, text) pairs; `forward` is the LLM, maybe DDP-wrapped or compiled.
    """

    def __init__(self, forward: nn.Module, tokenize: CaptionTokenizer, temperature: float = LLM2CLIP_TEMPERATURE,
                 gather_with_grad: bool = False, rank: int = 0, world_size: int = 1, device: str = "cpu",
                 autocast=contextlib.nullcontext(), batch_tokens: int = 1024, grad_checkpointing: bool = False):
        if temperature <= 0:
            raise TrainingError(f"--temperature must be positive, got {temperature}")
        self.forward, self.tokenize, self.temperature, self.device = forward, tokenize, temperature, device
        self.autocast = autocast  # bf16/fp16 autocast of the LLM's forward; pooling and loss stay fp32
        self.batch_tokens = batch_tokens  # padded tokens per forward on one process (see `features`)
        self.grad_checkpointing = grad_checkpointing  # the LLM's: keeps the fused attention kernel
        self.clip_loss = ClipLoss(gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N, C) L2-normalised pooled embeddings (fp32), through `embedder.pooled_embeddings` as `LLMEmbedder`
        computes them: the same tokens, attention and pooling (the preset's: mean or last token).

        On one process the texts run in length-sorted batches of at most `batch_tokens` padded tokens, so a long
        caption does not pad every short one to its length; the pooling makes each text's embedding independent
        of its batch. DDP allows one forward per backward, so under torchrun they run as one padded batch."""
        def forward(input_ids, attention):  # (b, T) -> (b, T, C), under autocast
            with self.autocast, attention_for_training(self.device, self.grad_checkpointing):
                return self.forward(input_ids, attention)
        ids, _ = self.tokenize(texts)
        one_batch = self.clip_loss.world_size > 1 and torch.is_grad_enabled()
        pooled = pooled_embeddings(forward, make_pool(self.tokenize.settings), ids, self.tokenize.unpooled,
                                   self.batch_tokens, self.device, one_batch=one_batch)
        return F.normalize(pooled, dim=-1)  # (N, C) in input order

    def features(self, pairs: list[tuple[str, str]], student_only: bool = False) -> dict[str, torch.Tensor]:
        """{"a": (B, C), "b": (B, C)}: the embeddings of each pair's anchor and positive."""
        pooled = self.embed([a for a, _ in pairs] + [b for _, b in pairs])  # (2B, C)
        return {"a": pooled[:len(pairs)], "b": pooled[len(pairs):]}

    def loss(self, features: dict[str, torch.Tensor], last: bool = True) -> tuple[torch.Tensor, dict]:
        """Symmetric InfoNCE with logits cos/τ; under torchrun over the global batch (ClipLoss gathers)."""
        loss = self.clip_loss(features["a"], features["b"], torch.tensor(1.0 / self.temperature))
        return loss, {"contrastive": loss.detach()}


# -----------------------------------------------------------------------------
# the stage in the training loop

class GroupDataset(torch.utils.data.Dataset):
    """The loader's items: group indices only (the texts are drawn in `Stage0.prepare`)."""

    def __init__(self, groups: Groups):
        self.size = len(groups)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return {"index": index}


class Stage0(CaptionContrastive):
    """CaptionContrastive as a training stage (stages.Stage): a batch of groups -> (anchor, positive) pairs, the
    adapters as the checkpoint's weights, and at the end the validation and the merged LLM."""

    def __init__(self, *, model: DecoderLM, groups: Groups, seed: int, lr: float, llm: str, lora: LoRASettings,
                 val_data: str | None, output: str, next_flags: list[str], no_sync, **loss_kwargs):
        super().__init__(**loss_kwargs)
        self.model, self.groups, self.seed, self.no_sync = model, groups, seed, no_sync
        self.dataset, self.sources = GroupDataset(groups), groups.sources  # a batch holds one source's groups
        self.lr_of = lambda name: ("lora", lr)  # AdamW's one parameter group: the adapters
        self.validate = None  # measured once, at the end (`finish`)
        self.llm, self.lora, self.val_data, self.output, self.next_flags = llm, lora, val_data, output, next_flags

    def prepare(self, batch: dict, epoch: int) -> dict:
        batch["pairs"] = pick_pairs(self.groups.texts, batch["indices"], self.seed, epoch)
        return batch

    def features(self, micro_batch: dict, student_only: bool = False) -> dict[str, torch.Tensor]:
        return super().features(micro_batch["pairs"], student_only)

    def after_step(self) -> None:
        pass  # only the adapters change, by the optimizer

    def counters(self) -> dict[str, int]:
        return {}

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        return lora_state_dict(self.model)

    @torch.no_grad()
    def finish(self, log) -> tuple[dict[str, float], str]:
        """`anchor_recall` on the --val-data groups with the adapters as trained (returned as {"val/<kind>": share}
        for metrics.jsonl), then the adapters merged into RUN/llm; and the next command."""
        metrics = {}
        if self.val_data:
            groups = read_groups(self.val_data, log=log)
            self.model.eval()
            recall = anchor_recall(self.embed, groups.texts, groups.kinds)
            log(f"stage 0 validation ({len(groups)} groups of {self.val_data}): each text's own anchor is its nearest "
                f"of the {len(groups)} anchors for " + ", ".join(f"{kind} {100 * share:.1f}%"
                                                               for kind, share in recall.items()))
            metrics = {f"val/{kind}": share for kind, share in recall.items()}
        folder = write_merged_llm(self.model, self.llm, os.path.join(self.output, "llm"), self.lora)
        log(f"merged LLM (adapters folded into the weights): {folder}")
        return metrics, " ".join(["python train.py --stage 1 --llm", folder, *self.next_flags])


def setup_stage0(config, device: torch.device, rank: int, world: int, resume_path: str | None, log) -> Stage0:
    """The LLM with LoRA adapters (a resumed run's from its checkpoint, which holds only them), its groups, and the
    stage, from the run's Config (config.py). The frozen base is bf16 under --precision amp_bf16, else fp32; the
    adapters are fp32."""
    run, data, llm, lora, embedding = config.run, config.data, config.models.llm, config.lora, config.embedding
    if embedding.pool == "latent":  # its pooler's weights would need training and merging too
        raise TrainingError("stage 0 trains mean- or last-token-pooled embedders, not NV-Embed's latent attention; "
                            "pass another --embed-preset, or use NV-Embed-v2 as it is in stages 1-2")
    precision = config.precision.precision
    groups = read_groups(data.train_data, strict=data.strict_data, log=log)
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float32
    model = load_stage0_llm(llm, embedding, lora, dtype, str(device), run.grad_checkpointing)
    adapted = {name.split(".")[-2] for name in lora_state_dict(model)}  # "layers.0.self_attn.q_proj.lora_A" -> q_proj
    missing = set(lora.targets) - adapted
    if missing:  # a typo would silently leave those layers untrained
        raise TrainingError(f"--lora-targets: {llm} has no {', '.join(sorted(missing))} layers")
    if resume_path:
        load_lora_state_dict(model, load_weights(resume_path)[0])
    log(f"stage 0: {len(groups)} groups in {len(set(groups.sources))} source(s) from {data.train_data}, LLM "
        f"{llm} ({dtype}), LoRA r {lora.rank} on {','.join(lora.targets)}, temperature {config.loss.temperature}, "
        f"{describe(precision, device)}, output {run.output}")
    forward, no_sync = wrap_forward(model, world, run.compile, dynamic=True)  # text lengths vary
    return Stage0(model=model, groups=groups, seed=run.seed, lr=config.optimizer.lr, llm=llm, lora=lora,
                  val_data=data.val_data, output=run.output, next_flags=embedding_flags(embedding), forward=forward,
                  no_sync=no_sync, tokenize=CaptionTokenizer(llm, embedding), temperature=config.loss.temperature,
                  gather_with_grad=config.loss.gather_with_grad, rank=rank, world_size=world, device=device,
                  autocast=autocast(device.type, precision), batch_tokens=config.precision.batch_tokens,
                  grad_checkpointing=run.grad_checkpointing)


def embedding_flags(settings: EmbedSettings) -> list[str]:
    """The flags that give stage 1 the embedding settings stage 0 trained with: the preset they come from (not
    named when "default"), with --bidirectional and --instruction where they differ from it."""
    for name in PRESETS:
        base = EmbedSettings.preset(name, max_length=settings.max_length)
        if replace(base, instruction=settings.instruction, causal=settings.causal) == settings:
            return [f"--embed-preset {name}"] * (name != "default") + \
                ["--bidirectional"] * (base.causal and not settings.causal) + \
                [f"--instruction {settings.instruction!r}"] * (settings.instruction != base.instruction)
    return []
