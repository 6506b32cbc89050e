"""Using a trained ProCLIP: `load_model(path)` gives its image and text encoders, with no cache and no eval.py.

    import miniproclip
    model = miniproclip.load_model("runs/stage2")                   # a run, a checkpoint or an exported folder
    images = model.encode_image(["cat.jpg", "dog.jpg"])              # (2, D), L2-normalised
    texts = model.encode_text(["a cat on a sofa", "ein Hund"])       # (2, D); the LLM runs live
    probs = (model.logit_scale.exp() * images @ texts.T).softmax(dim=-1)

`path` is one of three things:
- a train.py run folder (its latest checkpoint) or one `step_NNNNNN.safetensors` checkpoint: the CLIP and LLM
  folders and the embedding settings come from the checkpoint's meta. A stage-1 checkpoint holds the head only,
  so the image tower is the CLIP folder's own; a stage-2 one holds the tuned image tower too;
- a folder written by `python -m miniproclip.export` (an HF CLIP folder plus `text_head.safetensors` and
  `proclip.json`, which names the LLM folder and the embedding settings);
- a released LLM2CLIP/ProCLIP model (an eva_clip `.pt` or an LLM2CLIP HF folder, released.py), with `llm=` its
  LLM folder: captions are embedded with the llm2vec-llama3 preset.
This is the one place where a checkpoint becomes encoders: eval.py (`evaluation.proclip_encoders`) builds on it,
reading the LLM embeddings from the training text cache instead of running the LLM, so the numbers are the same.
"""

import json
import os
from dataclasses import dataclass

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from .backbones import load_clip, load_transform
from .checkpoint import config_sections, latest_checkpoint, load_meta, load_trained_weights, resolve_checkpoint
from .embedder import EmbedSettings, LLMEmbedder, default_batch_tokens
from .head import HeadConfig
from .image import ImageTransform, load_image
from .llm import LLMConfig
from .model import ProCLIP
from .released import is_released, load_released, released_transform
from .weights import PICKLE_SUFFIXES, ModelFolderError, is_open_clip_folder, load_state_dict_strict, read_config
from .precision import DTYPES, compute_dtype, default_precision

EXPORT_JSON = "proclip.json"  # marks an exported folder: head config, LLM folder, embedding settings
HEAD_FILE = "text_head.safetensors"  # the head's weights in an exported folder, under TextHead's own names
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WHAT_PATH_IS = ("pass a train.py run folder, a step_NNNNNN.safetensors checkpoint, a folder written by "
                "`python -m miniproclip.export`, or a released LLM2CLIP/ProCLIP model")


@dataclass
class TextSide:
    """How captions become the LLM embeddings the head was trained on."""
    llm_dir: str
    embedding: EmbedSettings  # max length, instruction prefix, EOS, causal or bidirectional
    llm_dtype: torch.dtype  # the LLM's weights when the training cache was filled (bf16 by default)
    batch_tokens: int  # padded tokens per LLM batch (count × longest caption)
    cache: str | None = None  # the run's text cache, which eval.py reads; None for an exported folder


class TrainedModel:
    """A trained ProCLIP as two encoders into CLIP's joint space; features come back as float32 on the CPU."""

    def __init__(self, model: ProCLIP, transform: ImageTransform, text: TextSide, clip_dir: str, name: str,
                 meta: dict, device: torch.device, dtype: torch.dtype | None):
        self.model, self.transform, self.text = model, transform, text
        self.clip_dir = clip_dir  # the CLIP folder of the preprocessing (and of the original towers)
        self.name, self.meta, self.device = name, meta, device  # name: the checkpoint or exported folder
        # what eval.py does by default: bf16 autocast on CUDA and bf16 CPUs, else fp32 (the weights stay fp32)
        self.dtype = dtype or compute_dtype(default_precision(device.type))
        self.llm_dtype = dtype or text.llm_dtype
        self.batch_size = 64  # images (or head inputs) per forward pass
        self._embedder = None

    def __repr__(self):
        return f"TrainedModel({self.name!r}, stage {self.meta.get('stage')}, LLM {self.text.llm_dir!r})"

    @property
    def embedder(self) -> LLMEmbedder:
        """The LLM (tokenizer + frozen decoder + mean pool), loaded on the first encode_text."""
        if self._embedder is None:
            self._embedder = LLMEmbedder(self.text.llm_dir, self.text.embedding, self.llm_dtype, str(self.device))
        return self._embedder

    @property
    def logit_scale(self) -> torch.Tensor:
        """The log of the inverse temperature, as in CLIP: logits = logit_scale.exp() * image @ text.T."""
        return self.model.logit_scale.detach().float().cpu()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        """A list of PIL images or image paths (or one of either) -> (N, D) L2-normalised features."""
        images = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        features = [torch.empty(0, self.model.visual_projection.out_features)]  # so no images give (0, D)
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            batch = [image if isinstance(image, Image.Image) else load_image(image) for image in batch]
            pixels = torch.stack([self.transform(image) for image in batch]).to(self.device)  # (B, 3, H, W)
            with self._autocast():
                features.append(self.model.encode_image(pixels).float().cpu())
        return torch.cat(features)

    @torch.no_grad()
    def encode_text(self, texts) -> torch.Tensor:
        """A list of captions (or one) -> (N, D) L2-normalised features: the LLM embeds them in length-sorted
        batches of at most `text.batch_tokens` padded tokens, then the head maps them into the joint space."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        embeddings, _ = self.embedder.embed(texts, self.text.batch_tokens)  # (N, hidden) fp32, in input order
        features = [torch.empty(0, self.model.text_head.config.output_dim)]
        for start in range(0, len(texts), self.batch_size):
            with self._autocast():
                features.append(self.model.encode_text(embeddings[start:start + self.batch_size].to(self.device))
                                .float().cpu())
        return torch.cat(features)


def _check_folder(source: str, kind: str, folder: str, keyword: str) -> None:
    if not os.path.isfile(os.path.join(folder, "config.json")) and not is_open_clip_folder(folder):
        raise ModelFolderError(f"the {kind} folder {folder} of {source} is not there (no config.json; a relative path "
                               f"is taken from the current folder): run from where train.py ran, or give the folder "
                               f"where it is now ({keyword}=DIR to load_model, --{keyword} DIR to export)")


def _from_checkpoint(path: str, clip: str | None, llm: str | None, device: torch.device):
    """(ProCLIP, TextSide, CLIP folder, meta, weights path) of a train.py run folder or checkpoint."""
    checkpoint = resolve_checkpoint(path)
    meta = load_meta(checkpoint)
    try:  # the run's config by section (a run saved with flat flags is read into the same sections)
        config = config_sections(meta)
        head, models = HeadConfig(**config["head"]), config["models"]
        text = TextSide(llm or models["llm"], EmbedSettings(**config["embedding"]),
                        DTYPES[config["precision"]["llm_dtype"]], default_batch_tokens(device),
                        config["data"]["text_cache"])
        clip_dir = clip or models["clip"]
    except (KeyError, TypeError) as err:
        raise ModelFolderError(f"{checkpoint}: its meta lacks {err}; is it a train.py checkpoint?") from None
    _check_folder(checkpoint, "CLIP", clip_dir, "clip")
    _check_folder(checkpoint, "LLM", text.llm_dir, "llm")
    sigmoid = config["loss"].get("contrastive_loss") == "sigmoid"  # its model has SigLIP's bias b
    model = ProCLIP.from_clip(load_clip(clip_dir), head, logit_bias=sigmoid)
    load_trained_weights(model, checkpoint)  # stage 1: the head; stage 2: everything (an EMA teacher is not used)
    return model, text, clip_dir, meta, checkpoint


def _from_export(folder: str, clip: str | None, llm: str | None, device: torch.device):
    """(ProCLIP, TextSide, CLIP folder, meta, folder) of a folder written by `python -m miniproclip.export`."""
    config_path, head_path = os.path.join(folder, EXPORT_JSON), os.path.join(folder, HEAD_FILE)
    if clip is not None:
        raise ModelFolderError(f"{folder} is an exported folder and holds its own CLIP towers; clip= applies to "
                               f"run folders and checkpoints only")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        head = HeadConfig(**config["head"])
        # a relative LLM path (--copy-llm) is inside the exported folder; join keeps an absolute one as it is
        text = TextSide(llm or os.path.join(folder, config["llm"]), EmbedSettings(**config["embedding"]),
                        DTYPES[config["llm_dtype"]], default_batch_tokens(device))
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{config_path}: not valid JSON ({err}); export the run again") from None
    except (KeyError, TypeError) as err:
        raise ModelFolderError(f"{config_path}: lacks or mistypes {err}; export the run again") from None
    _check_folder(config_path, "LLM", text.llm_dir, "llm")
    model = ProCLIP.from_clip(load_clip(folder), head)  # the tuned image tower and temperature
    try:
        head_weights = load_file(head_path)
    except (OSError, SafetensorError) as err:
        raise ModelFolderError(f"{head_path}: cannot read it ({err}); export the run again") from None
    load_state_dict_strict(model.text_head, head_weights, head_path)
    return model, text, folder, config.get("source", {}), folder


def _from_released(path: str, clip: str | None, llm: str | None, device: torch.device):
    """(ProCLIP, TextSide, path, meta, path) of a released LLM2CLIP/ProCLIP model (released.py); its LLM is the
    folder given as llm=, embedding captions as llm2vec does for Llama-3 (the preset both were trained with)."""
    if clip is not None:
        raise ModelFolderError(f"{path} is a released LLM2CLIP/ProCLIP model and holds its own image tower; clip= "
                               f"applies to run folders and checkpoints only")
    if llm is None:
        raise ModelFolderError(f"{path} is a released LLM2CLIP/ProCLIP model: pass the LLM its head was trained on, "
                               f"llm=DIR (eval.py --llm DIR), e.g. LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned")
    _check_folder(path, "LLM", llm, "llm")
    model = load_released(path)
    width = LLMConfig.from_folder(llm).hidden_size
    if width != model.text_head.config.input_dim:
        raise ModelFolderError(f"{path}: its text head takes {model.text_head.config.input_dim}-dim LLM embeddings but "
                               f"{llm} is {width} wide; pass the LLM it was trained on")
    text = TextSide(llm, EmbedSettings.preset("llm2vec-llama3"), DTYPES["bf16"], default_batch_tokens(device))
    return model, text, path, {"stage": "released"}, path


def _kind_of(path: str) -> str:
    """'export', 'released' or 'checkpoint', or a one-line error for a path that is none of them."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, EXPORT_JSON)):
        return "export"
    if os.path.exists(path) and is_released(path):
        return "released"
    if not os.path.exists(path) and not os.path.isfile(path + ".safetensors"):  # a step_NNNNNN stem is fine
        raise ModelFolderError(f"{path} does not exist; {WHAT_PATH_IS}")
    if os.path.isfile(path) and not path.endswith((".safetensors", *PICKLE_SUFFIXES)):  # pickles: refused later
        raise ModelFolderError(f"{path} is not a checkpoint (step_NNNNNN.safetensors); {WHAT_PATH_IS}")
    if os.path.isdir(path) and latest_checkpoint(path) is None:
        is_clip = os.path.isfile(os.path.join(path, "config.json")) and read_config(path).get("model_type") == "clip"
        hint = " It is a plain CLIP folder: load it with CLIP.from_pretrained, or pass it as clip=." if is_clip else ""
        raise ModelFolderError(f"{path} holds neither a checkpoint (step_*.safetensors) nor {EXPORT_JSON}; "
                               f"{WHAT_PATH_IS}.{hint}")
    return "checkpoint"


def load_model(path: str, *, clip: str | None = None, llm: str | None = None, device: str | None = None,
               dtype: torch.dtype | None = None) -> TrainedModel:
    """A trained ProCLIP from a run folder, a checkpoint or an exported folder, ready to encode.

    clip / llm: folders to use instead of those the checkpoint names (they moved); an exported folder takes llm only.
    device: default CUDA when available. dtype: the compute dtype, float32, bfloat16 or float16 (default: what
    eval.py does, bf16 autocast on CUDA and on CPUs with bf16 instructions, else fp32, with the LLM in the dtype its
    training cache was filled in).
    """
    path, clip, llm = os.fspath(path), clip and os.fspath(clip), llm and os.fspath(llm)
    if dtype not in (None, *COMPUTE_DTYPES):
        raise ValueError(f"dtype {dtype} is not one of torch.float32, torch.bfloat16, torch.float16")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = _kind_of(path)
    read = {"export": _from_export, "released": _from_released, "checkpoint": _from_checkpoint}[kind]
    model, text, clip_dir, meta, name = read(path, clip, llm, device)
    transform = released_transform(path, model) if kind == "released" else load_transform(clip_dir)
    return TrainedModel(model.eval().to(device), transform, text, clip_dir, name, meta, device, dtype)
