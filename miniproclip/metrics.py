"""Zero-shot evaluation metrics: retrieval recall@K, zero-shot classifier weights, accuracy and mean per-class recall.

Mirrors LAION-AI/CLIP_benchmark (`clip_benchmark/metrics/zeroshot_retrieval.py` and
`zeroshot_classification.py`, which itself follows open_clip's `zero_shot.py`) so that numbers are comparable with
published tables. Only the math lives here; dataset loading and feature extraction are the runners' job.
Where CLIP_benchmark's behaviour is an accident of its code (ties, K larger than the gallery, images without
captions, acc5 with fewer than 5 classes) we do what it does and say so at the spot.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

# CLIP_benchmark's clip_benchmark/datasets/en_zeroshot_classification_templates.json, verbatim: {dataset: [template]}
CLIP_BENCHMARK_TEMPLATES = (Path(__file__).parent / "assets" / "clip_benchmark"
                            / "en_zeroshot_classification_templates.json")


# -----------------------------------------------------------------------------
# retrieval

def _topk_indices(scores, k, gallery_name):
    """Indices of the k highest-scoring gallery items per query row, exactly as CLIP_benchmark: `torch.topk`.

    Ties at the K boundary are broken by torch.topk's internal order, which torch does not specify (on CPU it is
    an nth_element partition, so it is neither "lowest index first" nor stable across sizes); we keep it rather
    than invent a rule, so our numbers equal CLIP_benchmark's on the same scores. Exact ties only arise with
    duplicated images or captions. torch.topk fails when k exceeds the gallery, and so does CLIP_benchmark;
    we fail with a readable message instead of clamping k.
    """
    if k > scores.shape[1]:
        raise ValueError(f"recall@{k} needs at least {k} {gallery_name} in the gallery, got {scores.shape[1]}; "
                         f"pass smaller ks (CLIP_benchmark's torch.topk fails the same way)")
    return scores.topk(k, dim=1).indices  # (Q, k)


@torch.no_grad()
def retrieval_metrics(image_features, text_features, text_to_image, ks=(1, 5, 10)):
    """Recall@K both ways for a gallery of images each with one or more captions (CLIP_benchmark's definition).

    image_features: (I, D) and text_features: (T, D), both already L2-normalised.
    text_to_image: (T,) long, the index of the image each caption belongs to.
    Returns {"image_retrieval_recall@K": text->image, "text_retrieval_recall@K": image->text} as floats in [0, 1]:
    a text scores 1 if its image is among its top K images; an image scores 1 if ANY of its captions is among
    its top K texts (the "recall>0" of CLIP_benchmark's per-query recall). An image with no caption at all
    scores 0 and still counts in the mean (CLIP_benchmark's 0/0 = nan, and nan > 0 is False).
    """
    num_images, num_texts = len(image_features), len(text_features)
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must have shape ({num_texts},), one image index per text, "
                         f"got {tuple(text_to_image.shape)}")
    if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(f"text_to_image holds image indices outside [0, {num_images})")
    text_to_image = text_to_image.to(image_features.device)
    # one (T, I) score matrix, oriented as CLIP_benchmark's `texts_emb @ images_emb.t()`; fp32 so that bf16/fp16
    # features do not create ties of their own
    scores = text_features.float() @ image_features.float().T  # (T, I)
    image_ids = torch.arange(num_images, device=scores.device)
    metrics = {}
    for k in ks:
        # text -> image: hit when the caption's own image is among its top k images
        top_images = _topk_indices(scores, k, "images")  # (T, k)
        text_hits = (top_images == text_to_image[:, None]).any(dim=1)  # (T,)
        # image -> text: hit when any of the top k texts is a caption of this image
        top_texts = _topk_indices(scores.T, k, "texts")  # (I, k)
        image_hits = (text_to_image[top_texts] == image_ids[:, None]).any(dim=1)  # (I,)
        metrics[f"image_retrieval_recall@{k}"] = text_hits.float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = image_hits.float().mean().item()
    return metrics


# -----------------------------------------------------------------------------
# zero-shot classification

def load_templates(path=None, dataset="imagenet1k"):
    """Prompt templates, a JSON list of strings each with a `{c}` placeholder for the class name.

    Default (no path): CLIP_benchmark's templates for `dataset`; its "imagenet1k" list is the 80 ImageNet templates
    of OpenAI's `notebooks/Prompt_Engineering_for_ImageNet.ipynb`, in its order, with a `{c}` placeholder.
    """
    default = path is None
    path = CLIP_BENCHMARK_TEMPLATES if default else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"templates file {path} not found; pass a JSON list of strings with {{c}} in each")
    try:
        templates = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"templates file {path} is not valid JSON ({err}); it must be a list of strings") from None
    if default:
        templates = templates[dataset]  # one list per dataset name (classification.templates checks the name)
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise ValueError(f"templates file {path} must hold a non-empty JSON list of strings")
    for i, template in enumerate(templates):
        # str.format fills the class name in: it must place it, and parse (no "{}", "{0}" or lone "{")
        try:
            places_name = "\0" in template.format(c="\0")
        except (KeyError, IndexError, ValueError):
            places_name = False
        if not places_name:
            raise ValueError(f"template {i} in {path} ({template!r}) needs a {{c}} placeholder for the class name "
                             f"and no other braces")
    return templates


@torch.no_grad()
def zeroshot_classifier(text_encoder_fn, classnames, templates):
    """Zero-shot classifier weights (D, C): per class, the normalised mean of its normalised template embeddings.

    text_encoder_fn(list[str]) -> (N, D) text features (normalised or not: each is L2-normalised here).
    Mirrors CLIP_benchmark's `zero_shot_classifier` (and OpenAI's notebook); logits are then
    `100 * image_features @ weights` as in its `run_classification` (the scale changes no metric here).
    """
    weights = []
    for classname in tqdm(classnames, desc="zero-shot classifier", leave=False):
        texts = [template.format(c=classname) for template in templates]
        embeddings = F.normalize(text_encoder_fn(texts).float(), dim=-1)  # (n_templates, D)
        class_embedding = embeddings.mean(dim=0)  # (D,)
        weights.append(class_embedding / class_embedding.norm())
    return torch.stack(weights, dim=1)  # (D, C)


@torch.no_grad()
def classification_metrics(logits, labels):
    """acc1, acc5 and mean per-class recall for single-label logits (N, C) and labels (N,), as CLIP_benchmark.

    acc1/acc5 come from one `topk(5)` (its `accuracy`); with fewer than 5 classes acc5 is nan and acc1 uses
    topk(1). mean_per_class_recall is sklearn's `balanced_accuracy_score(labels, logits.argmax(1))`: the recall
    diag(confusion)/row-sum of each class that occurs in labels, averaged over those classes only.
    Note: acc1 (topk) and the argmax may pick different classes when a row's top logits tie exactly.
    """
    num_samples, num_classes = logits.shape
    if labels.shape != (num_samples,):
        raise ValueError(f"labels must have shape ({num_samples},), got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for logits with {num_classes} classes")
    labels = labels.to(logits.device)
    # top-k accuracy: the true class among the k highest logits
    topk = (1, 5) if num_classes >= 5 else (1,)
    top_classes = logits.topk(max(topk), dim=1, largest=True, sorted=True).indices  # (N, max k)
    correct = top_classes == labels[:, None]  # (N, max k), at most one True per row
    acc = {k: correct[:, :k].sum().item() / num_samples for k in topk}
    # balanced accuracy from the confusion matrix: its diagonal (hits per class) over its row sums (class sizes)
    pred = logits.argmax(dim=1)  # (N,)
    hits_per_class = torch.bincount(labels[pred == labels], minlength=num_classes)  # (C,) confusion diagonal
    samples_per_class = torch.bincount(labels, minlength=num_classes)  # (C,) confusion row sums
    present = samples_per_class > 0  # sklearn drops the nan rows of classes absent from labels
    recall_per_class = hits_per_class[present] / samples_per_class[present]
    return {"acc1": acc[1], "acc5": acc.get(5, float("nan")),
            "mean_per_class_recall": recall_per_class.mean().item()}
