"""Stages 1 and 2 from the run's Config (config.py): CLIP and the head, the data, the LLM cache, the teachers, the
wrapping.

`setup_clip_stage` is what `stage0.setup_stage0` is for stage 0: everything a stage needs before the first step,
a resumed run's weights included, returned as the stages.Stage that the loop (loop.py) runs. The optimizer, the
GradScaler and the data cursor are the loop's (loop.py).
"""

import torch

from ..backbones import load_clip, load_transform
from ..checkpoint import load_trained_weights
from ..clip import CLIP
from ..data import DataError, caption_texts, read_rows
from ..embed import VectorCache, ensure_text_cache
from ..errors import TrainingError
from ..evaluation import Encoders, RetrievalSet, inference, run_retrieval
from ..image import RandomResizedCropTransform
from ..llm import LLMConfig
from ..loader import ImageTextDataset
from ..losses import ClipLoss, SigmoidLoss
from ..model import ProCLIP
from ..precision import DTYPES, autocast, compute_dtype, describe
from .config import Config
from .stages import HeadOnly, Stage1, Stage2, wrap_forward
from .teacher_cache import RowVectors, caption_columns, image_teacher_vectors, place_image_teacher, release_memory, \
    stage1_vectors

VISION = ("vision_model.", "visual_projection.")  # the image tower's parameters get --lr-vision


def build_model(config: Config, clip: CLIP, source: str | None) -> ProCLIP:
    """ProCLIP from the CLIP's image tower and the config's head (that of the checkpoint `source` started from)."""
    # the head maps the LLM's width (d) to CLIP's joint space (D); a checkpoint fixes both
    head, projection_dim = config.head, clip.config.projection_dim
    llm_width = LLMConfig.from_folder(config.models.llm).hidden_size
    if head.output_dim != projection_dim:
        raise TrainingError(f"{source}: its head maps to {head.output_dim} dims but {config.models.clip} has a "
                            f"{projection_dim}-dim joint space; use a checkpoint trained with this CLIP")
    if head.input_dim != llm_width:
        raise TrainingError(f"{source}: its head takes {head.input_dim}-dim LLM embeddings but {config.models.llm} "
                            f"is {llm_width} wide; use the --llm it was trained with")
    return ProCLIP.from_clip(clip, head, logit_bias=config.loss.contrastive_loss == "sigmoid")


def read_data(config: Config, log) -> tuple[list, list, VectorCache]:
    """Training rows, validation rows (when evaluating) and the LLM embedding cache covering both."""
    data = config.data
    keys = {"csv_img_key": data.csv_img_key, "csv_caption_key": data.csv_caption_key,
            "csv_separator": data.csv_separator}
    rows = read_rows(data.train_data, strict=data.strict_data, log=log, **keys)
    val_rows = read_rows(data.val_data, log=log, **keys) if data.val_data and config.run.eval_every else []
    cache = ensure_text_cache(data.text_cache, config.models.llm, caption_texts(rows + val_rows), config.embedding,
                              DTYPES[config.precision.llm_dtype], config.run.device, config.precision.batch_tokens,
                              log)
    return rows, val_rows, cache


def train_transform(config: Config):
    """Stage 2's image transform: the official RandomResizedCrop(0.9-1.0) or CLIP's centre crop."""
    base = load_transform(config.models.clip)
    return RandomResizedCropTransform(base=base) if config.data.train_crop == "random" else base


def check_images(train_data: str, dataset: ImageTextDataset) -> None:
    """Fail early when the images are not where the rows say."""
    probe = [dataset[i] for i in range(min(len(dataset), 64))]  # a sample of a bad image carries "bad_image"
    if all("bad_image" in sample for sample in probe):
        raise DataError(f"{train_data}: none of the first {len(probe)} images is readable (e.g. "
                        f"{probe[0]['bad_image']}); check the image paths, which are relative to the data file")


def retrieval_validation(config: Config, model: ProCLIP, val_rows: list, cache: VectorCache,
                         device: torch.device):
    """--eval-every's measure: retrieval R@K both ways on the --val-data rows (one caption each), with the model as
    it is at the call, through eval.py's retrieval runner and CLIP's eval (centre crop) transform; None without
    validation rows."""
    def validate() -> dict[str, float]:
        # one caption per image: row i's caption belongs to image i
        dataset = RetrievalSet([r.image for r in val_rows], [r.caption for r in val_rows], list(range(len(val_rows))),
                               "val")
        clip, precision = config.models.clip, config.precision.precision
        encode_text = inference(lambda texts: model.encode_text(cache(texts).to(device)), device, precision)
        encoders = Encoders(config.run.output, clip, load_transform(clip),
                            inference(model.encode_image, device, precision), encode_text, lambda texts: 0)
        model.eval()
        report, _ = run_retrieval(encoders, dataset, config.optimizer.batch_size, 0, device,
                                  [k for k in (1, 5, 10) if k <= len(val_rows)])
        model.train()
        return {f"val/{k}": v for k, v in report["metrics"].items()}
    return validate if val_rows else None


def setup_clip_stage(config: Config, device: torch.device, rank: int, world: int, checkpoints,
                     log) -> Stage1 | Stage2:
    """Stage 1 or 2, ready for the loop: the model (fp32 master weights; autocast does the low-precision math) from
    --clip and the --init checkpoint (a stage-1 one gives the head, a stage-2 one everything) or a resumed run's
    weights, the rows with their caches and teachers, and the trained part wrapped for DDP and torch.compile."""
    clip = load_clip(config.models.clip)
    model = build_model(config, clip, checkpoints.init_path or checkpoints.resume_path)
    if checkpoints.init_path:
        meta = load_trained_weights(model, checkpoints.init_path)[1]
        log(f"init: stage-{meta['stage']} weights from {checkpoints.init_path} (step {meta['step']})")
    del clip  # the model copied its image tower; stage 1's text teacher is loaded again only to fill its cache
    model.vision_model.encoder.grad_checkpointing = config.run.grad_checkpointing
    # data and the LLM cache (filled on first use, its LLM released after); each stage then sets up its teachers
    rows, val_rows, cache = read_data(config, log)
    release_memory(device)
    opt, precision = config.optimizer, config.precision.precision
    shared = dict(model=model, device=device, autocast=autocast(device.type, precision), loss_settings=config.loss,
                  grad_checkpointing=config.run.grad_checkpointing,
                  lr_of=lambda name: ("vision", opt.lr_vision) if name.startswith(VISION) else ("head", opt.lr),
                  validate=retrieval_validation(config, model, val_rows, cache, device))
    if config.run.stage == 1:
        stage = setup_stage1(config, rows, cache, checkpoints.resume_path, world, shared, log)
    else:
        stage = setup_stage2(config, rows, cache, checkpoints.resume_path, rank, world, shared, log)
    log(f"stage {config.run.stage}: {len(rows)} rows from {config.data.train_data}, CLIP {config.models.clip}, "
        f"LLM {config.models.llm}, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters, "
        f"{world} rank(s), {describe(precision, device)}, output {config.run.output}")
    return stage


def setup_stage1(config: Config, rows: list, cache: VectorCache, resume_path: str | None, world: int,
                 shared: dict, log) -> Stage1:
    """Stage 1: the head alone trains, on the device alone (with the image tower for --eval-every's retrieval),
    against CLIP's text features read from their cache; DDP and torch.compile wrap the text side only, with
    dynamic shapes since the row count varies with the long captions."""
    model, device = shared["model"], shared["device"]
    model.requires_grad_(False).text_head.requires_grad_(True)
    llm_vectors, taught = stage1_vectors(cache, rows, config.models.clip, device, shared["autocast"], log)
    (model if config.run.eval_every and config.data.val_data else model.text_head).to(device)
    if resume_path:
        load_trained_weights(model, resume_path)
    forward, no_sync = wrap_forward(HeadOnly(model), world, config.run.compile, dynamic=True)
    return Stage1(forward=forward, no_sync=no_sync, dataset=ImageTextDataset(rows, None, seed=config.run.seed),
                  llm_vectors=llm_vectors, teacher_vectors=taught,
                  skip_truncated_long=config.loss.skip_truncated_long,
                  next_command=f"python train.py --stage 2 --init {config.run.output}", **shared)


def setup_stage2(config: Config, rows: list, cache: VectorCache, resume_path: str | None, rank: int, world: int,
                 shared: dict, log) -> Stage2:
    """Stage 2: everything trains (--lock-image-layers freezes the stem and the first N layers) against L_reg's
    teacher, a frozen (or EMA) copy of the initial image tower: its features v̂ cached with --ema-momentum 1 and
    --train-crop center, else run live beside the model."""
    model, device = shared["model"], shared["device"]
    locked, loss = config.models.lock_image_layers, config.loss
    if locked is not None:
        vision = model.vision_model
        for module in [vision.embeddings, vision.pre_layrnorm, *vision.encoder.layers[:locked]]:
            module.requires_grad_(False)
    dataset = ImageTextDataset(rows, train_transform(config), seed=config.run.seed)
    check_images(config.data.train_data, dataset)
    teacher, frozen, taught = model.image_teacher(), loss.ema_momentum == 1, None
    model.to(device)
    if frozen and config.data.train_crop == "center":  # the teacher's features never change: computed once
        taught = image_teacher_vectors(teacher, rows, dataset.transform, cache.path, device, shared["autocast"],
                                       config.data.workers, log)
        teacher = None
        release_memory(device)
    else:
        teacher = place_image_teacher(teacher, device, compute_dtype(config.precision.precision), frozen)
    if resume_path:  # a resumed run's weights, and its EMA teacher
        teacher_weights = load_trained_weights(model, resume_path)[0]
        if teacher_weights:
            teacher.load_state_dict(teacher_weights)
    forward, no_sync = wrap_forward(model, world, config.run.compile)
    return Stage2(forward=forward, no_sync=no_sync, dataset=dataset,
                  llm_vectors=RowVectors.map(cache, caption_columns(rows)),
                  teacher=teacher, teacher_vectors=taught, ema_momentum=loss.ema_momentum,
                  long_prob=config.data.long_prob, seed=config.run.seed,
                  contrastive_loss=SigmoidLoss(rank, world) if loss.contrastive_loss == "sigmoid" else
                  ClipLoss(loss.local_loss, loss.gather_with_grad, rank, world),
                  next_command=f"python eval.py --task retrieval --model {config.run.output}", **shared)
