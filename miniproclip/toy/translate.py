"""The toy world's translations: a picture's full short caption (count, size, texture, colour, shape, position,
background) in German, French, Spanish and Japanese, with each language's gender and number agreement and word
order. `TRANSLATE[lang](attributes)` is what world.py writes under a row's "translations"; `TRANSLATE[lang](attributes,
STAGE0_ORDER)` is the same scene in stage 0's word order (place first, then the objects: "auf dunklem Hintergrund,
links: zwei kleine rote Kreise"), which no evaluation caption uses, so that the toy tests whether stage 0 generalises
from one phrasing to another.
"""

CAPTION_ORDER, STAGE0_ORDER = "caption", "stage0"  # evaluation captions' word order / stage 0's

DE_NOUNS = {"circle": ("Kreis", "Kreise", "m"), "square": ("Quadrat", "Quadrate", "n"),
            "triangle": ("Dreieck", "Dreiecke", "n"), "star": ("Stern", "Sterne", "m"),
            "cross": ("Kreuz", "Kreuze", "n"), "diamond": ("Raute", "Rauten", "f")}
DE = {"small": "klein", "large": "groß", "plain": "einfarbig", "striped": "gestreift", "dotted": "gepunktet",
      "red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "purple": "violett", "orange": "orangefarben",
      "left": "links", "right": "rechts", "top": "oben", "bottom": "unten", "center": "in der Mitte",
      "dark": "auf dunklem Hintergrund", "gray": "auf grauem Hintergrund", "light": "auf hellem Hintergrund"}
FR = {"small": "petit", "large": "grand", "plain": "uni", "striped": "rayé", "dotted": "à pois", "red": "rouge",
      "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet", "orange": "orange", "circle": "cercle",
      "square": "carré", "triangle": "triangle", "star": "étoile", "cross": "croix", "diamond": "losange",
      "left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas", "center": "au centre",
      "dark": "sur fond sombre", "gray": "sur fond gris", "light": "sur fond clair", 2: "deux", 3: "trois"}
ES = {"small": "pequeño", "large": "grande", "plain": "liso", "striped": "a rayas", "dotted": "de lunares",
      "red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado", "orange": "naranja",
      "circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella", "cross": "cruz",
      "diamond": "rombo", "left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
      "center": "en el centro", "dark": "sobre fondo oscuro", "gray": "sobre fondo gris",
      "light": "sobre fondo claro", 2: "dos", 3: "tres"}
JA = {"small": "小さな", "large": "大きな", "plain": "無地の", "striped": "縞模様の", "dotted": "水玉模様の",
      "red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "purple": "紫の", "orange": "オレンジ色の",
      "circle": "円", "square": "四角形", "triangle": "三角形", "star": "星", "cross": "十字", "diamond": "ひし形",
      "left": "左側", "right": "右側", "top": "上部", "bottom": "下部", "center": "中央",
      "dark": "暗い", "gray": "灰色の", "light": "明るい", 1: "一つ", 2: "二つ", 3: "三つ"}
ROMANCE_FEMININE = {"star", "cross"}  # étoile, croix / estrella, cruz; the other shapes are masculine
INVARIABLE = {"orange", "naranja", "à pois", "a rayas", "de lunares"}


def romance_form(word: str, feminine: bool, plural: bool, spanish: bool) -> str:
    """French or Spanish gender and number agreement of the (regular) words in the tables above."""
    if word in INVARIABLE:
        return word
    if spanish:  # rojo -> roja -> rojas; azul -> azules; cruz -> cruces
        word = word[:-1] + "a" if feminine and word.endswith("o") else word
        return word if not plural else "cruces" if word == "cruz" else word + ("s" if word[-1] in "aeo" else "es")
    if feminine:  # vert -> verte, rayé -> rayée, violet -> violette; rouge stays
        word = "violette" if word == "violet" else word if word.endswith("e") else word + "e"
    return word + "s" if plural and word[-1] not in "sx" else word  # croix stays croix


def german(a: dict, order: str = CAPTION_ORDER) -> str:
    singular, plural, gender = DE_NOUNS[a["shape"]]
    if a["count"] == 1:  # "ein kleiner roter Kreis": strong adjective endings after the indefinite article
        head, ending, noun = ("eine" if gender == "f" else "ein"), {"m": "er", "n": "es", "f": "e"}[gender], singular
    else:  # "zwei kleine rote Kreise"
        head, ending, noun = ("zwei", "drei")[a["count"] - 2], "e", plural
    adjectives = " ".join(DE[a[k]] + ending for k in ("size", "texture", "colour"))
    return place_last(f"{head} {adjectives} {noun}", DE[a["position"]], DE[a["background"]], order)


def place_last(objects: str, position: str, background: str, order: str) -> str:
    """"OBJECTS POSITION BACKGROUND" (the captions' order) or "BACKGROUND, POSITION: OBJECTS" (stage 0's)."""
    return f"{objects} {position} {background}" if order == CAPTION_ORDER else f"{background}, {position}: {objects}"


def romance(a: dict, spanish: bool, order: str = CAPTION_ORDER) -> str:
    """French: size before the noun, colour and texture after it; Spanish: colour, size and texture after it."""
    words, f, pl = ES if spanish else FR, a["shape"] in ROMANCE_FEMININE, a["count"] > 1
    keys = ("size", "texture", "colour", "shape")
    form = {k: romance_form(words[a[k]], f and k != "shape", pl, spanish) for k in keys}
    head = (("una" if spanish else "une") if f else "un") if not pl else words[a["count"]]
    middle = "{shape} {colour} {size} {texture}" if spanish else "{size} {shape} {colour} {texture}"
    return place_last(f"{head} {middle.format(**form)}", words[a["position"]], words[a["background"]], order)


def japanese(a: dict, order: str = CAPTION_ORDER) -> str:
    objects = f"{JA[a['size']]}{JA[a['texture']]}{JA[a['colour']]}{JA[a['shape']]}"
    place = f"{JA[a['background']]}背景の{JA[a['position']]}"
    if order == CAPTION_ORDER:  # "暗い背景の左側に、小さな縞模様の青い四角形が二つある。": on the dark background's left, two ...
        return f"{place}に、{objects}が{JA[a['count']]}ある。"
    # "二つの小さな...四角形が、暗い背景の左側に見える。": two small ... squares are seen on the dark background's left
    return f"{JA[a['count']]}の{objects}が、{place}に見える。"


TRANSLATE = {"de": german, "fr": lambda a, order=CAPTION_ORDER: romance(a, False, order),
             "es": lambda a, order=CAPTION_ORDER: romance(a, True, order), "ja": japanese}
