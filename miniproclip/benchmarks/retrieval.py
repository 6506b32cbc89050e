"""Readers for the retrieval benchmarks ProCLIP reports (Table 1 and XM3600), from the files as they are released.

Each `read_<name>(root, **options)` takes the dataset's folder as it unpacks, or the folder that contains it, and
returns a RetrievalSet (`split` names the subset read). Each reader follows the evaluation code whose numbers the paper
compares with, cited in its docstring; captions are taken as that code takes them, never stripped or rewritten
beyond it. ProCLIP's own retrieval code (VisionXLab/ProCLIP `training/data.py` RetrievalDataset,
`training/eval_datasets.yaml`) reads the annotation files that microsoft/LLM2CLIP's
`llm2clip/data/extract_eval_embedding.py` and `setup_eval_datasets.sh` build from these same releases.
A missing or mis-laid dataset, or a damaged annotation file, raises BenchmarkError; a missing image file does not
(the runner skips unreadable images and counts them).
"""

import json
import os
import re

from . import RetrievalSet
from ..data import json_lines
from ..errors import BenchmarkError

XM3600_LANGUAGES = ["ar", "bn", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr", "he", "hi", "hr", "hu",
                    "id", "it", "ja", "ko", "mi", "nl", "no", "pl", "pt", "quz", "ro", "ru", "sv", "sw", "te", "th",
                    "tr", "uk", "vi", "zh"]  # CLIP_benchmark crossmodal3600.SUPPORTED_LANGUAGES, in its order
SHAREGPT4V_FIRST = 1000  # ShareGPT4V-1k: the first 1,000 entries (Long-CLIP share4v_val_dataset.total_len)

LAYOUTS = {
    "flickr30k": "Karpathy's dataset_flickr30k.json (cs.stanford.edu/people/karpathy/deepimagesent/"
                 "caption_datasets.zip) or BLIP's flickr30k_test.json (storage.googleapis.com/"
                 "sfr-vision-language-research/datasets/) beside flickr30k-images/ "
                 "(shannon.cs.illinois.edu/DenotationGraph/)",
    "coco": "Karpathy's dataset_coco.json (cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip) or "
            "BLIP's coco_karpathy_test.json (storage.googleapis.com/sfr-vision-language-research/datasets/) beside "
            "val2014/ (images.cocodataset.org/zips/val2014.zip)",
    "sharegpt4v-1k": "share-captioner_coco_lcs_sam_1246k_1107.json (huggingface.co/datasets/Lin-Chen/ShareGPT4V) "
                     "beside the image folders its 'image' paths start with (coco/train2017/, sam/images/, ...)",
    "urban1k": "image/{i}.jpg and caption/{i}.txt (Urban1k.zip from huggingface.co/datasets/BeichenZhang/Urban1k)",
    "docci": "docci_descriptions.jsonlines and images/ (storage.googleapis.com/docci/data/docci_descriptions.jsonlines"
             " and docci_images.tar.gz)",
    "dci": "densely_captioned_images/ with splits.json, annotations/*.json and photos/ "
           "(dl.fbaipublicfiles.com/densely_captioned_images/dci.tar.gz; photos: SA-1B's sa_000138.tar)",
    "xm3600": "captions.jsonl and images/{key}.jpg (google.github.io/crossmodal-3600/web-data/captions.zip and "
              "open-images-dataset.s3.amazonaws.com/crossmodal-3600/images.tgz)",
}
FOLDERS = {"flickr30k": ("flickr30k",), "coco": ("coco",), "sharegpt4v-1k": ("sharegpt4v", "data"),
           "urban1k": ("Urban1k",), "docci": ("docci",), "dci": ("densely_captioned_images",),
           "xm3600": ("xm3600",)}  # the dataset's folder name(s) as it unpacks, looked for inside `root`


# ----------------------------------------------------------------------------- files

def locate(root: str, name: str, files: tuple[str, ...]) -> tuple[str, str]:
    """(dataset folder, file): `root` or one of its FOLDERS[name] subfolders, the first holding one of `files`."""
    for folder in (root, *(os.path.join(root, sub) for sub in FOLDERS[name])):
        for file in files:
            if os.path.exists(os.path.join(folder, file)):
                return folder, file
    raise BenchmarkError(f"{name}: {os.path.join(root, files[0])} not found (nor under {'/, '.join(FOLDERS[name])}/); "
                         f"expected {LAYOUTS[name]}")


def load_json(path: str, lines: bool = False):
    """A JSON file's value, or with `lines` a JSONL file's [(line number, row)] (blank lines skipped).
    Damaged JSON raises BenchmarkError naming the file and line."""
    if lines:
        rows = list(json_lines(path))
        for number, row in rows:
            if isinstance(row, ValueError):
                raise damaged_json(path, number, row)
        return rows
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise damaged_json(path, err.lineno, err) from None


def damaged_json(path: str, line_number: int, err: ValueError) -> BenchmarkError:
    detail = f"{err.msg}, column {err.colno}" if isinstance(err, json.JSONDecodeError) else str(err)
    return BenchmarkError(f"{path}:{line_number}: damaged JSON ({detail}); download the file again")


def malformed(path: str, where: str, err: Exception, expected: str) -> BenchmarkError:
    """The error for an entry that lacks a field or has one of the wrong type."""
    return BenchmarkError(f"{path}: {where} is malformed ({type(err).__name__}: {err}); expected {expected}")


FIELD_ERRORS = (KeyError, IndexError, TypeError, AttributeError)  # what a missing or mistyped field raises


def gallery(pairs, split: str | None) -> RetrievalSet:
    """A RetrievalSet from (image path, [captions]) pairs, captions in order, each mapped to its image."""
    dataset = RetrievalSet([], [], [], split)
    for image, captions in pairs:
        dataset.images.append(image)
        dataset.texts += captions
        dataset.text_to_image += [len(dataset.images) - 1] * len(captions)
    return dataset


# ----------------------------------------------------------------------------- Flickr30k and COCO

def read_karpathy(path: str, images_dir: str | None = None, split: str = "test",
                  five_captions: bool = False) -> RetrievalSet:
    """The `split` images of a Karpathy JSON {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]},
    every "raw" sentence as written (the first five with `five_captions`); image paths are images_dir (default: the
    JSON's folder)/filepath/filename (filepath: val2014 or train2014 in dataset_coco.json, absent for Flickr30k)."""
    images_dir = images_dir or os.path.dirname(os.path.abspath(path))
    expected = '{"images": [{"filename", "split", "sentences": [{"raw"}]}]}'
    try:
        entries = load_json(path)["images"]
        chosen = [entry for entry in entries if entry["split"] == split]
    except FIELD_ERRORS as err:
        raise malformed(path, "the Karpathy JSON", err, expected) from None
    if not chosen:
        splits = ", ".join(sorted({str(entry.get("split")) for entry in entries}))
        raise BenchmarkError(f"{path} has no image with split {split!r} (it has: {splits}); pass one of those")
    pairs = []
    for index, entry in enumerate(chosen):
        try:
            image = os.path.join(images_dir, entry.get("filepath", ""), entry["filename"])
            captions = [sentence["raw"] for sentence in entry["sentences"]]
        except FIELD_ERRORS as err:
            raise malformed(path, f"{split} image {index}", err, expected) from None
        pairs.append((image, captions[:5] if five_captions else captions))
    return gallery(pairs, split)


def read_blip(path: str, images_dir: str, five_captions: bool = False) -> RetrievalSet:
    """BLIP's retrieval test file [{"image": relative path, "caption": [str, ...]}], as ProCLIP's RetrievalDataset
    (training/data.py, from LLM2CLIP's) reads it: every caption as written (BLIP's own loader would lowercase them with
    pre_caption; the first five with `five_captions`), images at images_dir/image."""
    pairs = []
    for index, entry in enumerate(load_json(path)):
        try:
            captions = [entry["caption"]] if isinstance(entry["caption"], str) else list(entry["caption"])
            pairs.append((os.path.join(images_dir, entry["image"]), captions[:5] if five_captions else captions))
        except FIELD_ERRORS as err:
            raise malformed(path, f"entry {index}", err, '[{"image": path, "caption": [str, ...]}]') from None
    return gallery(pairs, "test")


def read_flickr30k(root: str) -> RetrievalSet:
    """Flickr30k's 1,000 Karpathy test images with their 5 captions each, from Karpathy's dataset_flickr30k.json
    (images flickr30k-images/{filename}) or BLIP's flickr30k_test.json (images at the folder/{image}, the file
    LLM2CLIP's setup_eval_datasets.sh downloads, there renamed test.json). CLIP_benchmark reads the same split from
    its own flickr30k_test_karpathy.txt (clip_benchmark/datasets/flickr.py)."""
    folder, file = locate(root, "flickr30k", ("dataset_flickr30k.json", "flickr30k_test.json"))
    if file == "dataset_flickr30k.json":
        return read_karpathy(os.path.join(folder, file), os.path.join(folder, "flickr30k-images"))
    return read_blip(os.path.join(folder, file), folder)


def read_coco(root: str, five_captions: bool = False) -> RetrievalSet:
    """COCO's 5,000 Karpathy test images, from Karpathy's dataset_coco.json (images {filepath}/{filename}, i.e.
    val2014/...) or BLIP's coco_karpathy_test.json (images at the folder/{image}). Every caption by default: some
    images have 6 or 7, and CLIP_benchmark (builder.py "mscoco_captions": torchvision CocoCaptions over
    coco_test_karpathy.json) scores them all; `five_captions` keeps the first five (Long-CLIP
    eval/retrieval/coco.py)."""
    folder, file = locate(root, "coco", ("dataset_coco.json", "coco_karpathy_test.json"))
    if file == "dataset_coco.json":
        return read_karpathy(os.path.join(folder, file), folder, five_captions=five_captions)
    return read_blip(os.path.join(folder, file), folder, five_captions)


# ----------------------------------------------------------------------------- long-caption sets

def read_sharegpt4v_1k(root: str) -> RetrievalSet:
    """ShareGPT4V-1k: the first 1,000 entries of share-captioner_coco_lcs_sam_1246k_1107.json, one caption each,
    conversations[1]["value"], image = the JSON's folder + entry["image"] (beichenzbc/Long-CLIP
    train/sharegpt4v.py share4v_val_dataset, the set its eval scores; the caption as LLM2CLIP's
    extract_eval_embedding.py sharegpt4v() stores it for ProCLIP, without Long-CLIP's "\\n" -> " ")."""
    folder, file = locate(root, "sharegpt4v-1k", ("share-captioner_coco_lcs_sam_1246k_1107.json",))
    path, pairs = os.path.join(folder, file), []
    entries = load_json(path)
    if not isinstance(entries, list) or len(entries) < SHAREGPT4V_FIRST:
        raise BenchmarkError(f"{path} should be a list of at least {SHAREGPT4V_FIRST} entries; expected "
                             f"{LAYOUTS['sharegpt4v-1k']}")
    for index, entry in enumerate(entries[:SHAREGPT4V_FIRST]):
        try:
            pairs.append((os.path.join(folder, entry["image"]), [entry["conversations"][1]["value"]]))
        except FIELD_ERRORS as err:
            raise malformed(path, f"entry {index}", err, '{"image", "conversations": [{...}, {"value"}]}') from None
    return gallery(pairs, "test")


def read_urban1k(root: str) -> RetrievalSet:
    """Urban-1k: image/{i}.jpg with the first line of caption/{i}.txt, i = 1, 2, ... in order (microsoft/LLM2CLIP
    extract_eval_embedding.py urban1k(), which ProCLIP's eval reads; Long-CLIP eval/retrieval/Urban1k.py takes the
    same `readlines()[0]`, newline included, in os.listdir order)."""
    folder, file = locate(root, "urban1k", ("caption",))
    captions_dir = os.path.join(folder, file)
    stems = [name[:-len(".txt")] for name in os.listdir(captions_dir) if name.endswith(".txt")]
    numbers = sorted((stem for stem in stems if stem.isdigit()), key=int)  # 1, 2, ..., 10 (not 1, 10, 2)
    if not numbers:
        raise BenchmarkError(f"urban1k: no {{i}}.txt caption file in {captions_dir}; expected {LAYOUTS['urban1k']}")
    pairs = []
    for i in numbers:
        caption_path = os.path.join(captions_dir, f"{i}.txt")
        with open(caption_path, encoding="utf-8") as f:
            lines = f.readlines()
        if not lines:
            raise BenchmarkError(f"{caption_path} is empty; expected the caption on its first line")
        pairs.append((os.path.join(folder, "image", f"{i}.jpg"), [lines[0]]))
    return gallery(pairs, "test")


def read_docci(root: str) -> RetrievalSet:
    """DOCCI's test rows (split == "test"; train, qual_dev and qual_test left out) of docci_descriptions.jsonlines,
    one description each, image images/{image_file} (google/docci's release; LLM2CLIP
    extract_eval_embedding.py docci() and FLAME src/training/eval_docci.py read the rows this way, FLAME with
    "\\n" -> " ")."""
    folder, file = locate(root, "docci", ("docci_descriptions.jsonlines",))
    path, pairs = os.path.join(folder, file), []
    for number, row in load_json(path, lines=True):
        try:
            if row["split"] == "test":
                pairs.append((os.path.join(folder, "images", row["image_file"]), [row["description"]]))
        except FIELD_ERRORS as err:
            expected = '{"example_id", "split", "image_file", "description"}'
            raise malformed(path, f"line {number}", err, expected) from None
    if not pairs:
        raise BenchmarkError(f"{path} has no row with split 'test'; expected {LAYOUTS['docci']}")
    return gallery(pairs, "test")


def flame_dci_caption(short_caption: str, extra_caption: str) -> str:
    """FLAME's DCI caption: f"{short}\\n{extra}" cut at newlines, "</s>" and every ".", the pieces stripped, empty
    ones dropped, joined with ". " (MIV-XJTU/FLAME src/training/eval_dci.py dci_val_dataset.split_caption)."""
    pieces = re.split(r"\n|</s>|[.]", f"{short_caption}\n{extra_caption}")
    return ". ".join(piece.strip() for piece in pieces if piece.strip())


def read_dci(root: str, split: str = "all") -> RetrievalSet:
    """DCI: one caption per image, flame_dci_caption(short_caption, extra_caption), image photos/{annotation "image"}.
    split="all" takes every split of splits.json in its order, as FLAME's
    eval_dci.py does; split="test" (or "train", "valid") takes one of them, as facebookresearch/DCI's
    dataset/impl.py get_complete_dataset_with_settings(split) selects."""
    folder, file = locate(root, "dci", ("splits.json",))
    path = os.path.join(folder, file)
    splits = load_json(path)
    if not isinstance(splits, dict) or (split != "all" and split not in splits):
        names = ", ".join(splits) if isinstance(splits, dict) else "none"
        raise BenchmarkError(f"{path} has no split {split!r} (it has: {names}); pass split='all' or one of those")
    annotation_files = [name for names in splits.values() for name in names] if split == "all" else splits[split]
    pairs = []
    for name in annotation_files:
        annotation_path = os.path.join(folder, "annotations", name)
        if not os.path.isfile(annotation_path):
            raise BenchmarkError(f"dci: {annotation_path} (listed in {path}) not found; expected {LAYOUTS['dci']}")
        annotation = load_json(annotation_path)
        try:
            caption = flame_dci_caption(annotation["short_caption"], annotation["extra_caption"])
            pairs.append((os.path.join(folder, "photos", annotation["image"]), [caption]))
        except FIELD_ERRORS as err:
            expected = '{"image", "short_caption", "extra_caption"}'
            raise malformed(annotation_path, "the annotation", err, expected) from None
    return gallery(pairs, split)


# ----------------------------------------------------------------------------- multilingual

def read_xm3600(root: str, language: str = "en", all_captions: bool = False) -> RetrievalSet:
    """Crossmodal-3600 in one language: per row of captions.jsonl, image images/{row["image/key"]}.jpg with
    row[language]["caption"][0], as CLIP_benchmark clip_benchmark/datasets/crossmodal3600.py create_annotation_file
    builds its set; `all_captions` keeps every caption in that language. An image with no caption in the language
    is left out. `split` is the language code."""
    if language not in XM3600_LANGUAGES:
        raise BenchmarkError(f"xm3600: unknown language {language!r}; use one of {', '.join(XM3600_LANGUAGES)}")
    folder, file = locate(root, "xm3600", ("captions.jsonl",))
    path, pairs = os.path.join(folder, file), []
    for number, row in load_json(path, lines=True):
        try:
            captions = list(row[language]["caption"])
            image = os.path.join(folder, "images", f"{row['image/key']}.jpg")
        except FIELD_ERRORS as err:
            expected = f'{{"image/key", "{language}": {{"caption": [str, ...]}}}}'
            raise malformed(path, f"line {number}", err, expected) from None
        if captions:
            pairs.append((image, captions if all_captions else captions[:1]))
    return gallery(pairs, language)


RETRIEVAL_READERS = {"flickr30k": read_flickr30k, "coco": read_coco, "sharegpt4v-1k": read_sharegpt4v_1k,
                     "urban1k": read_urban1k, "docci": read_docci, "dci": read_dci, "xm3600": read_xm3600}
