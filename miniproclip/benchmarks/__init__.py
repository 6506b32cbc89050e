"""The benchmarks ProCLIP reports, read from the layouts they are released in.

Every reader returns one of the two shapes below, which evaluation.py's runners score with CLIP_benchmark's
metrics (metrics.py): a retrieval gallery (images, their captions) or a labelled classification set.
"""

from dataclasses import dataclass


@dataclass
class RetrievalSet:
    images: list[str]  # gallery image paths
    texts: list[str]  # every caption of every image
    text_to_image: list[int]  # the gallery index of each caption's image
    split: str | None = None


@dataclass
class ClassificationSet:
    images: list  # image paths, or image.ArrayImage where a set ships pixel arrays (CIFAR): load_image reads both
    labels: list[int]  # class index of each image
    classnames: list[str]  # display names in class-index order
