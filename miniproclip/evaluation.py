"""Zero-shot evaluation for eval.py: eval dataset readers, models as feature extractors, retrieval / zero-shot runners.

Mirrors LAION-AI/CLIP_benchmark (`clip_benchmark/metrics/zeroshot_retrieval.py`, `zeroshot_classification.py`):
normalised image and text features of the whole test set, then the metric math of `metrics.py`. Readers:
- Karpathy-split JSON (Flickr30k, COCO): {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}
  (benchmarks/retrieval.py read_karpathy, beside the readers of each benchmark's released layout)
- caption JSONL, one image per line: {"image": path, "captions": [str, ...]} (Urban1k, DCI, ShareGPT4V, the toy
  world); multilingual sets (XM3600) either give "captions" as {language: [str, ...]} or one "language" per row
- an ImageNet-style folder (one subfolder per class, classes in sorted order, as torchvision's ImageFolder)
Where CLIP_benchmark stops at an unreadable image, we drop it (and, in retrieval, its captions) and list it.
"""

import hashlib
import json
import os
import textwrap
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .backbones import load_clip, load_tokenizer, load_transform
from .benchmarks import ClassificationSet, RetrievalSet
from .benchmarks.retrieval import read_karpathy
from .api import load_model
from .embed import ensure_text_cache, llm_identity
from .embedder import CaptionTokenizer
from .data import json_lines
from .errors import BenchmarkError
from .metrics import classification_metrics, retrieval_metrics, zeroshot_classifier
from .image import ImageReadError, ImageTransform, load_image
from .precision import autocast

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
THUMB, PAD, CAPTION_WIDTH = 112, 6, 260  # --show grid: thumbnail side, gap, caption column (pixels)


# ----------------------------------------------------------------------------- datasets

def read_caption_jsonl(path: str, images_dir: str | None = None, language: str | None = None) -> RetrievalSet:
    """Rows {"image", "captions"}; relative image paths start at images_dir (default: the JSONL's folder).

    With `language`, "captions" given as {language: [...]} are taken in that language and rows carrying a
    "language" field are kept only when it matches; rows without captions in that language are left out.
    """
    images_dir = images_dir or os.path.dirname(os.path.abspath(path))
    dataset = RetrievalSet([], [], [])
    for number, row in json_lines(path):
        try:
            if isinstance(row, ValueError):  # a line that is not JSON
                raise row
            captions = row["captions"]
            if isinstance(captions, dict):
                if language is None:
                    raise BenchmarkError(f"{path}:{number}: captions per language ({', '.join(captions)}); "
                                         f"pass language (--language)")
                captions = captions.get(language, [])
            elif language is not None and row.get("language", language) != language:
                continue
            captions = [captions] if isinstance(captions, str) else captions
            if not captions:
                continue
            if not all(isinstance(c, str) for c in captions) or not isinstance(row["image"], str):
                raise TypeError("image and captions must be strings")
        except BenchmarkError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise BenchmarkError(f"{path}:{number}: expected {{\"image\": path, \"captions\": [str, ...]}} "
                                 f"({type(err).__name__}: {err})") from None
        dataset.images.append(os.path.join(images_dir, row["image"]))
        dataset.texts += captions
        dataset.text_to_image += [len(dataset.images) - 1] * len(captions)
    if not dataset.images:
        in_language = f" in language {language!r}" if language else ""
        raise BenchmarkError(f"{path} holds no image with captions{in_language}")
    return dataset


def read_retrieval_set(path: str, images_dir: str | None = None, split: str = "test",
                       language: str | None = None) -> RetrievalSet:
    """A .jsonl caption file or a Karpathy JSON, by extension."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"retrieval dataset {path} not found; pass a Karpathy-split .json or a .jsonl of "
                             f'{{"image", "captions"}} rows')
    if path.endswith(".jsonl"):
        return read_caption_jsonl(path, images_dir, language)
    if language is not None:
        raise BenchmarkError(f"language (--language) applies to .jsonl caption files, not to the Karpathy JSON {path}")
    return read_karpathy(path, images_dir, split)


def read_lines(path: str) -> list[str]:
    """The non-empty lines of a text file (class names), stripped."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"{path} not found; pass a file with one class name per line")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_image_folder(folder: str, classnames_path: str | None = None) -> ClassificationSet:
    """ImageNet-style folder: one subfolder per class in sorted order; display names from classnames_path
    (one per line, same order), else the folder names with '_' as spaces."""
    if not os.path.isdir(folder):
        raise BenchmarkError(f"zero-shot dataset {folder} is not a folder; pass one with a subfolder per class")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise BenchmarkError(f"{folder} has no class subfolders; expected one subfolder of images per class")
    images, labels = [], []
    for label, name in enumerate(classes):
        for root, _, files in sorted(os.walk(os.path.join(folder, name), followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    images.append(os.path.join(root, file))
                    labels.append(label)
    classnames = [name.replace("_", " ") for name in classes]
    if classnames_path is not None:
        classnames = read_lines(classnames_path)
        if len(classnames) != len(classes):
            raise BenchmarkError(f"{classnames_path} has {len(classnames)} names but {folder} has {len(classes)} "
                                 f"class folders; give one name per class, in sorted folder order")
    if not images:
        raise BenchmarkError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return ClassificationSet(images, labels, classnames)


# ----------------------------------------------------------------------------- models as feature extractors

@dataclass
class Encoders:
    """A model as the runners see it; both encoders return L2-normalised fp32 features."""
    name: str  # the CLIP folder or checkpoint path
    clip_dir: str  # the CLIP folder it comes from (for a baseline run to compare with)
    transform: ImageTransform
    encode_image: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) on device -> (B, D)
    encode_text: Callable[[list[str]], torch.Tensor]  # B captions -> (B, D)
    prepare_texts: Callable[[list[str]], int]  # before encode_text: fills ProCLIP's cache; returns #truncated
    use_text_cache: Callable[[str], None] | None = None  # ProCLIP: point the LLM text cache at another file
    text_tag: str | None = None  # ProCLIP: the LLM's name and identity hash, for naming cache files


def inference(encode: Callable, device: torch.device, precision: str) -> Callable:
    """`encode` run without autograd, under the autocast of --precision (amp_bf16, amp = fp16, fp32 = none)."""
    def run(inputs):
        with torch.no_grad(), autocast(device.type, precision):
            return encode(inputs)
    return run


def clip_encoders(folder: str, device: str, precision: str) -> Encoders:
    """A plain CLIP or SigLIP folder: its own towers, tokenizer (77 or 64 tokens) and preprocessing."""
    device = torch.device(device)
    clip, tokenizer = load_clip(folder).to(device), load_tokenizer(folder)
    encode_image = inference(lambda pixels: clip.encode_image(pixels, normalize=True), device, precision)
    encode_text = inference(lambda texts: clip.encode_text(tokenizer(texts).input_ids.to(device), normalize=True),
                             device, precision)
    return Encoders(folder, folder, load_transform(folder), encode_image, encode_text,
                    lambda texts: tokenizer(texts).num_truncated)


def proclip_encoders(checkpoint: str, text_cache: str | None, device: str, precision: str, log=print,
                     llm: str | None = None) -> Encoders:
    """A ProCLIP checkpoint as `load_model` reads it (api.py), with the LLM embeddings from the text cache."""
    trained = load_model(checkpoint, llm=llm, device=device)
    model, text, device = trained.model, trained.text, trained.device
    text_cache = text_cache or text.cache
    cache = None

    def use_text_cache(path):  # the benchmark suite gives each benchmark's texts their own cache file
        nonlocal text_cache
        text_cache = path

    def prepare_texts(texts):
        nonlocal cache
        cache = ensure_text_cache(text_cache, text.llm_dir, texts, text.embedding, text.llm_dtype, str(device),
                                  text.batch_tokens, log)
        return CaptionTokenizer(text.llm_dir, text.embedding)(texts)[1]

    encode_text = inference(lambda texts: model.encode_text(cache(texts).to(device)), device, precision)
    identity = json.dumps(llm_identity(text.llm_dir, text.embedding), sort_keys=True).encode()
    tag = f"{os.path.basename(os.path.normpath(text.llm_dir))}_{hashlib.sha256(identity).hexdigest()[:12]}"
    return Encoders(checkpoint, trained.clip_dir, trained.transform, inference(model.encode_image, device, precision),
                    encode_text, prepare_texts, use_text_cache, tag)


# ----------------------------------------------------------------------------- encoding

class ImageFiles(Dataset):
    """Item i: (i, (3, H, W) pixels), or (i, None) when the file cannot be read."""

    def __init__(self, paths: list[str], transform: ImageTransform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, self.transform(load_image(self.paths[index]))
        except ImageReadError:
            return index, None


def _collate(items):
    """(indices of readable images, their (B, 3, H, W) pixels or None, indices of unreadable ones)."""
    good = [(index, pixels) for index, pixels in items if pixels is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [index for index, _ in good], pixels, [index for index, pixels in items if pixels is None]


def encode_images(encoders: Encoders, paths: list[str], batch_size: int, workers: int, device: str):
    """(features (N_readable, D) in path order, readable indices, unreadable paths)."""
    loader = DataLoader(ImageFiles(paths, encoders.transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    features, readable, unreadable = [], [], []
    for indices, pixels, bad in tqdm(loader, desc="images", unit="batch", dynamic_ncols=True):
        unreadable += [paths[i] for i in bad]
        if pixels is not None:
            features.append(encoders.encode_image(pixels.to(device)).float().cpu())
            readable += indices
    if not readable:
        raise BenchmarkError(f"none of the {len(paths)} images could be read (first: {paths[0]}); check the paths "
                             f"(images_dir, --images) and the files")
    return torch.cat(features), readable, unreadable


def encode_texts(encoders: Encoders, texts: list[str], batch_size: int):
    """(features (T, D), number of captions the text side truncates)."""
    truncated = encoders.prepare_texts(texts)
    features = [encoders.encode_text(texts[start:start + batch_size]).float().cpu()
                for start in tqdm(range(0, len(texts), batch_size), desc="texts", unit="batch", dynamic_ncols=True)]
    return torch.cat(features), truncated


# ----------------------------------------------------------------------------- runners

def run_retrieval(encoders: Encoders, dataset: RetrievalSet, batch_size: int, workers: int, device: str, ks,
                  images=None):
    """Recall@K both ways over the readable images and their captions. Returns (report, gallery for --show).
    images: encode_images' (features, readable, unreadable) of dataset.images when already encoded."""
    image_features, readable, unreadable = images or encode_images(encoders, dataset.images, batch_size, workers,
                                                                   device)
    new_index = {old: new for new, old in enumerate(readable)}  # gallery index after dropping unreadable images
    kept = [t for t, image in enumerate(dataset.text_to_image) if image in new_index]
    texts = [dataset.texts[t] for t in kept]
    text_to_image = torch.tensor([new_index[dataset.text_to_image[t]] for t in kept], dtype=torch.long)
    text_features, truncated = encode_texts(encoders, texts, batch_size)
    try:
        metrics = retrieval_metrics(image_features, text_features, text_to_image, ks)
    except ValueError as err:  # a K larger than the gallery: metrics.py names it and the remedy
        raise BenchmarkError(f"{dataset.split} set: {err}") from None
    report = {"metrics": metrics, "n_images": len(readable), "n_texts": len(texts), "split": dataset.split,
              "truncated_captions": truncated, "skipped_images": unreadable}
    gallery = {"images": [dataset.images[i] for i in readable], "texts": texts, "text_to_image": text_to_image,
               "image_features": image_features, "text_features": text_features}
    return report, gallery


def run_zeroshot(encoders: Encoders, dataset: ClassificationSet, templates: list[str], batch_size: int,
                 workers: int, device: str, heldout: list[str] | None = None):
    """acc1, acc5 and mean per-class recall of the zero-shot classifier built from `templates`; with `heldout`
    class names, also acc1 over the images of those classes and of the others (all classes competing)."""
    image_features, readable, unreadable = encode_images(encoders, dataset.images, batch_size, workers, device)
    labels = torch.tensor([dataset.labels[i] for i in readable], dtype=torch.long)
    # every prompt encoded once, in large batches; zeroshot_classifier then averages them per class
    prompts = list(dict.fromkeys(t.format(c=name) for name in dataset.classnames for t in templates))
    prompt_features, truncated = encode_texts(encoders, prompts, batch_size)
    row_of = {prompt: i for i, prompt in enumerate(prompts)}
    classifier = zeroshot_classifier(lambda texts: prompt_features[[row_of[t] for t in texts]],
                                     dataset.classnames, templates)  # (D, C)
    logits = 100.0 * image_features @ classifier  # CLIP_benchmark's logits
    metrics = classification_metrics(logits, labels)
    if heldout is not None:
        unknown = sorted(set(heldout) - set(dataset.classnames))
        if unknown:
            raise BenchmarkError(f"held-out class {unknown[0]!r} is not among the dataset's classnames")
        is_heldout = torch.tensor([dataset.classnames[label] in heldout for label in labels.tolist()])
        for name, rows in (("seen", ~is_heldout), ("heldout", is_heldout)):
            hits = logits[rows].argmax(dim=1) == labels[rows]
            metrics[f"acc1_{name}"] = hits.float().mean().item() if rows.any() else float("nan")
    return {"metrics": metrics, "n_images": len(readable), "n_texts": len(prompts), "split": None,
            "n_classes": len(dataset.classnames), "truncated_captions": truncated, "skipped_images": unreadable}


def show_grid(path: str, gallery: dict, num_queries: int, top: int = 5) -> tuple[int, int]:
    """PNG: per row a caption and its `top` images, the right one framed green (others grey). Returns (W, H)."""
    num_texts, top = len(gallery["texts"]), min(top, len(gallery["images"]))
    queries = [i * num_texts // num_queries for i in range(min(num_queries, num_texts))]  # spread over the set
    scores = gallery["text_features"][queries] @ gallery["image_features"].T  # (K, I), as in retrieval_metrics
    size = (CAPTION_WIDTH + top * (THUMB + PAD) + PAD, len(queries) * (THUMB + PAD) + PAD)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for row, q in enumerate(queries):
        y = PAD + row * (THUMB + PAD)
        right = gallery["text_to_image"][q].item()
        rank = int((scores[row] > scores[row, right]).sum()) + 1  # of the right image, 1 = first
        caption = "\n".join(textwrap.wrap(gallery["texts"][q], 40)[:7])  # what fits beside the thumbnails
        draw.multiline_text((PAD, y), f"{caption}\n[right image: rank {rank}]", fill="black")
        for column, image_index in enumerate(scores[row].topk(top).indices.tolist()):
            x = CAPTION_WIDTH + column * (THUMB + PAD)
            try:
                image = load_image(gallery["images"][image_index])
                thumb = ImageOps.fit(image, (THUMB - 8, THUMB - 8))  # centre crop to a square, then resize
            except ImageReadError:
                continue
            draw.rectangle([x, y, x + THUMB - 1, y + THUMB - 1], fill="green" if image_index == right else "#ccc")
            canvas.paste(thumb, (x + 4, y + 4))
    canvas.save(path)
    return size
