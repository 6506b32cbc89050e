"""The run's typed configuration: one dataclass per concern, composed into `Config` and resolved once.

`resolve_config` turns train.py's flags into the Config, every value final, in this order (the first that has a
value wins): the flags typed on the command line, what a resumed run brings (every flag not typed again, but not
the launch's own --resume, --device, --workers), the toy world's data, models and recipe (without --train-data),
each stage's defaults (flags.py `stage_defaults`), then argparse's defaults. Nothing changes the Config after.

A checkpoint saves the Config by named section (`Config.sections`: "run", "models", "data", "optimizer", "loss",
"embedding", "lora", "head", "precision"); the library reads those sections (api.py), never flag names, and
checkpoint.config_sections reads runs saved before, with their flat flag dictionary, into the same sections. The
fields of the plain sections are named as their flags (--lr-vision is optimizer.lr_vision); the embedding, LoRA
and head sections are built from their flags (EMBED_FLAGS, LORA_FLAGS, HEAD_FLAGS) and kept whole on resume.
Mirrors open_clip's params.py split from the trainer: the library takes explicit values, only training sees flags.
"""

import argparse
from dataclasses import asdict, dataclass, field, fields

from ..backbones import joint_width
from ..checkpoint import config_sections
from ..errors import TrainingError
from ..embedder import EmbedSettings
from ..head import HeadConfig
from ..llm import LLMConfig
from ..lora import LoRASettings
from .flags import Checkpoints, find_checkpoints, inherited_settings, stage_defaults
from .stages import LossSettings


@dataclass
class RunSettings:
    stage: int = 1  # 0: LLM embedder, 1: representation inheritance, 2: contrastive tuning
    init: str | None = None  # stage 2: the run it starts from ("scratch": a fresh head)
    resume: str | None = None  # this launch's --resume (never inherited)
    output: str = ""  # the run folder
    seed: int = 0
    save_every: int = 500
    keep: int = 3  # checkpoints kept
    log_every: int = 1
    eval_every: int = 0  # 0: never
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping
    toy_dir: str = "toyworld"
    device: str = "cpu"  # this launch's (under torchrun the rank's GPU)
    compile: bool = False
    grad_checkpointing: bool = False


@dataclass
class ModelSettings:
    clip: str | None = None  # the CLIP folder (HF or open_clip)
    llm: str | None = None  # the HF LLM folder
    lock_image_layers: int | None = None  # stage 2: frozen stem and first N ViT layers; None: all train


@dataclass
class DataSettings:
    train_data: str | None = None
    val_data: str | None = None
    text_cache: str | None = None  # the LLM embedding cache (stages 1-2)
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str | None = None
    strict_data: bool = False
    workers: int = 2  # this launch's loader processes (never inherited)
    train_crop: str = "random"  # stage 2: "random" (official) or "center"
    long_prob: float = 0.5  # stage 2: chance a row shows its long caption


@dataclass
class OptimizerSettings:
    batch_size: int = 64  # per rank, after accumulation
    accum_freq: int = 1
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    lr: float = 1e-3  # the head's (stage 0: the adapters')
    lr_vision: float = 1e-5  # stage 2's image tower
    wd: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 50  # linear warmup steps, then cosine decay to 0
    warmup_ratio: float = 0.0  # when > 0, the warmup is this share of the run's steps instead (stage 0: 0.1)
    grad_clip_norm: float = 1.0  # 0: no clipping

    def warmup_steps(self, total_steps: int) -> int:
        return max(1, int(total_steps * self.warmup_ratio)) if self.warmup_ratio > 0 else self.warmup


@dataclass
class PrecisionSettings:
    precision: str = "fp32"  # autocast of training (precision.PRECISIONS)
    llm_dtype: str = "bf16"  # the LLM's weights when it fills the text cache
    batch_tokens: int = 1024  # padded tokens per LLM batch


@dataclass
class Config:
    run: RunSettings = field(default_factory=RunSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    embedding: EmbedSettings = field(default_factory=EmbedSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    head: HeadConfig | None = None  # stages 1-2: the text head's shape (from the run it starts from, else flags)
    precision: PrecisionSettings = field(default_factory=PrecisionSettings)

    def sections(self) -> dict[str, dict]:
        """The checkpoint's form: {section: {field: value}}."""
        return asdict(self)

    @classmethod
    def from_sections(cls, sections: dict[str, dict]) -> "Config":
        """The Config of saved sections; a field a newer Config added takes its default."""
        built = {name: section_type(**{k: v for k, v in sections[name].items() if k in names_of(section_type)})
                 for name, section_type in SECTION_TYPES.items() if sections.get(name) is not None}
        if "lora" in built:
            built["lora"].targets = tuple(built["lora"].targets)  # a JSON list
        return cls(**built)


SECTION_TYPES = {"run": RunSettings, "models": ModelSettings, "data": DataSettings, "optimizer": OptimizerSettings,
                 "loss": LossSettings, "embedding": EmbedSettings, "lora": LoRASettings, "head": HeadConfig,
                 "precision": PrecisionSettings}
PLAIN_SECTIONS = ("run", "models", "data", "optimizer", "loss", "precision")  # fields named as their flags
EMBED_FLAGS = ("embed_preset", "max_length", "instruction", "bidirectional")
LORA_FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
HEAD_FLAGS = ("head_blocks", "head_mlp_ratio", "head_dropout")


def names_of(section_type) -> set[str]:
    return {f.name for f in fields(section_type)}


def saved_config(meta: dict | None) -> Config | None:
    """The Config a checkpoint's meta holds (either format), or None without a meta."""
    return Config.from_sections(config_sections(meta)) if meta else None


def flag_values(config: Config) -> dict:
    """The plain sections' values by flag name (what a resumed run brings to the flags not typed again)."""
    return {k: v for name in PLAIN_SECTIONS for k, v in asdict(getattr(config, name)).items()}


def resolve_config(args: argparse.Namespace, given: set[str], world: int, toy=None,
                   log=print) -> tuple[Config, Checkpoints]:
    """Flags -> (the run's Config, its checkpoints), in the order of the docstring above. `given`: the flags typed
    on the command line; `args.device` is already the launch's (under torchrun the rank's GPU). `toy`: the toy
    world's `paths` and `recipe` (toy/defaults.py, passed in by the entry points: training never imports the toy
    world), used without --train-data."""
    checkpoints = find_checkpoints(args, given, world)
    resumed = saved_config(checkpoints.resumed_meta)
    values = argparse.Namespace(**vars(args))
    inherited = inherited_settings(values, given, checkpoints, resumed and flag_values(resumed),
                                   saved_config(checkpoints.init_meta))
    vars(values).update(inherited)
    fixed = set(given) | set(inherited)  # values the later rules leave alone
    if values.train_data is None and toy is None:
        raise TrainingError("--train-data DATA is needed here (only train.py falls back to the toy world)")
    if values.train_data is None:  # the toy world (built on first use), its CLIP teacher and SmolLM2
        vars(values).update(toy.paths(values.stage, values.toy_dir, values.llm, values.text_cache, values.val_data,
                                      values.clip, log))
        recipe = toy.recipe(values.stage, values.init == "scratch")
        vars(values).update({k: v for k, v in recipe.items() if k not in fixed})
    vars(values).update(stage_defaults(values, fixed))
    sections = {name: section_type(**{k: v for k, v in vars(values).items() if k in names_of(section_type)})
                for name, section_type in SECTION_TYPES.items() if name in PLAIN_SECTIONS}
    # the sections built from flags: a resumed run keeps its own unless one of their flags is typed again
    def keep(flags):
        return resumed is not None and not set(flags) & set(given)
    embedding = resumed.embedding if keep(EMBED_FLAGS) else EmbedSettings.from_flags(
        values.embed_preset, values.max_length, values.instruction, False, values.bidirectional)
    lora = resumed.lora if keep(LORA_FLAGS) else LoRASettings(
        rank=values.lora_rank, alpha=values.lora_alpha, dropout=values.lora_dropout,
        targets=tuple(t if t.endswith("_proj") else f"{t}_proj" for t in values.lora_targets.split(",") if t))
    config = Config(**sections, embedding=embedding, lora=lora, head=resolve_head(values, resumed, checkpoints))
    return config, checkpoints


def resolve_head(values: argparse.Namespace, resumed: Config | None, checkpoints: Checkpoints) -> HeadConfig | None:
    """Stages 1-2: the head of the run resumed or started from (--init), else one shaped by the flags mapping the
    LLM's width to the CLIP's joint width. Stage 0 has none."""
    if values.stage == 0:
        return None
    started_from = resumed or saved_config(checkpoints.init_meta)
    if started_from is not None and started_from.head is not None:
        return started_from.head
    return HeadConfig(input_dim=LLMConfig.from_folder(values.llm).hidden_size, output_dim=joint_width(values.clip),
                      num_blocks=values.head_blocks, mlp_ratio=values.head_mlp_ratio, dropout=values.head_dropout)
