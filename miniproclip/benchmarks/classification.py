"""Readers for the zero-shot classification benchmarks of ProCLIP's Table 2, from the files as they are released.

Each `read_<name>(root)` takes the dataset's folder as it unpacks, or the folder that contains it, and returns a
ClassificationSet of its test images, labels and class names. Which images, which labels and which names follow
LAION-AI/CLIP_benchmark (`clip_benchmark/datasets/builder.py` build_dataset with split="test", language "en"), whose
numbers the paper reports: for most sets that is torchvision's dataset class (`torchvision/datasets/<name>.py`),
with the class names as build_dataset rewrites them or replaces them from its `en_classnames.json`. Both of its
JSON files are stored verbatim in miniproclip/assets/clip_benchmark/; `templates(name)` gives its prompts.
CLIP_benchmark has no test split for SUN397 and Caltech-101: it scores every image of the release, as done here.
A missing or mis-laid dataset, a damaged list file or a wrong number of classes raises BenchmarkError; a missing
image file does not (the runner skips unreadable images and counts them). CIFAR ships its pixels inside pickles:
its images are image.ArrayImage rows of one array, which load_image turns into PIL images one at a time.
"""

import glob
import json
import os
import pickle
from pathlib import Path

import numpy as np

from . import ClassificationSet
from ..errors import BenchmarkError
from ..image import ArrayImage
from ..metrics import CLIP_BENCHMARK_TEMPLATES, load_templates
from .matfile import read_mat

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLIP_BENCHMARK_CLASSNAMES = ASSETS / "clip_benchmark" / "en_classnames.json"  # verbatim from CLIP_benchmark
IMAGENET_WNIDS = ASSETS / "imagenet_wnids.txt"  # builder.py's all_imagenet_wordnet_ids: sorted, class-index order
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's

LAYOUTS = {
    "imagenet1k": "val/ with the 50,000 validation images sorted into 1,000 synset folders n01440764/ ... "
                  "(ILSVRC2012_img_val.tar from image-net.org, sorted by the devkit's labels, e.g. with valprep.sh)",
    "cifar10": "cifar-10-batches-py/ with test_batch and batches.meta (cifar-10-python.tar.gz from "
               "www.cs.toronto.edu/~kriz/cifar.html)",
    "cifar100": "cifar-100-python/ with test and meta (cifar-100-python.tar.gz from "
                "www.cs.toronto.edu/~kriz/cifar.html)",
    "food101": "food-101/ with meta/test.json and images/<class>/<id>.jpg (food-101.tar.gz from "
               "data.vision.ee.ethz.ch/cvl/food-101.tar.gz)",
    "sun397": "SUN397/ with ClassName.txt and the images under <letter>/<class>/sun_*.jpg (SUN397.tar.gz from "
              "vision.princeton.edu/projects/2010/SUN/)",
    "fgvc_aircraft": "fgvc-aircraft-2013b/ with data/variants.txt, data/images_variant_test.txt and data/images/ "
                     "(fgvc-aircraft-2013b.tar.gz from www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/)",
    "dtd": "dtd/ with labels/test1.txt and images/<class>/ (dtd-r1.0.1.tar.gz from www.robots.ox.ac.uk/~vgg/data/dtd/)",
    "pets": "oxford-iiit-pet/ with annotations/test.txt and images/ (images.tar.gz and annotations.tar.gz from "
            "www.robots.ox.ac.uk/~vgg/data/pets/)",
    "caltech101": "101_ObjectCategories/ with its 102 class folders, BACKGROUND_Google included (caltech-101.zip "
                  "from data.caltech.edu/records/mzrjq-6wc02)",
    "cars": "stanford_cars/ with devkit/cars_meta.mat, cars_test_annos_withlabels.mat and cars_test/ (torchvision's "
            "StanfordCars layout: car_devkit.tgz, cars_test.tgz and cars_test_annos_withlabels.mat, e.g. from the "
            "Kaggle mirror of ai.stanford.edu/~jkrause/cars/car_dataset.html)",
    "flowers": "flowers-102/ with jpg/, imagelabels.mat and setid.mat (102flowers.tgz, imagelabels.mat and setid.mat "
               "from www.robots.ox.ac.uk/~vgg/data/flowers/102/)",
}
# where the dataset folder may sit inside `root` (its name as it unpacks; torchvision's folder for CLIP_benchmark's
# roots), and the file (or folder) that marks it
FOLDERS = {
    "imagenet1k": (("val",), "n01440764"),
    "cifar10": (("cifar-10-batches-py",), "test_batch"),
    "cifar100": (("cifar-100-python",), "test"),
    "food101": (("food-101",), "meta/test.json"),
    "sun397": (("SUN397",), "ClassName.txt"),
    "fgvc_aircraft": (("fgvc-aircraft-2013b",), "data/images_variant_test.txt"),
    "dtd": (("dtd", "dtd/dtd"), "labels/test1.txt"),
    "pets": (("oxford-iiit-pet",), "annotations/test.txt"),
    "caltech101": (("101_ObjectCategories", "caltech101/101_ObjectCategories"), "BACKGROUND_Google"),
    "cars": (("stanford_cars",), "devkit/cars_meta.mat"),
    "flowers": (("flowers-102",), "setid.mat"),
}
NUM_CLASSES = {"imagenet1k": 1000, "cifar10": 10, "cifar100": 100, "food101": 101, "sun397": 397,
               "fgvc_aircraft": 100, "dtd": 47, "pets": 37, "caltech101": 102, "cars": 196, "flowers": 102}


# ----------------------------------------------------------------------------- shared pieces

def locate(root: str, name: str) -> str:
    """The dataset folder: `root` itself or one of its FOLDERS[name] subfolders, the first holding the marker."""
    subfolders, marker = FOLDERS[name]
    for folder in (root, *(os.path.join(root, sub) for sub in subfolders)):
        if os.path.exists(os.path.join(folder, marker)):
            return folder
    raise BenchmarkError(f"{name}: {os.path.join(root, subfolders[0], marker)} not found; expected {LAYOUTS[name]}")


def numbered_lines(path: str, name: str) -> list[tuple[int, str]]:
    """[(line number, line without its end)] of a text file's non-blank lines."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"{name}: {path} not found; expected {LAYOUTS[name]}")
    with open(path, encoding="utf-8") as f:
        return [(number, line.rstrip("\r\n")) for number, line in enumerate(f, 1) if line.strip()]


def malformed(path: str, number: int, line: str, expected: str) -> BenchmarkError:
    """The error for line `number` of a list file, which is not of the form `expected`."""
    return BenchmarkError(f"{path}:{number}: malformed line {line!r}; expected {expected}")


def checked(name: str, source: str, images: list, labels: list[int], classnames: list[str]) -> ClassificationSet:
    """The set, once its class count is the release's: a partial list would shift every label after a gap."""
    if len(classnames) != NUM_CLASSES[name]:
        raise BenchmarkError(f"{name}: {source} gives {len(classnames)} classes, the release has "
                             f"{NUM_CLASSES[name]}; expected {LAYOUTS[name]}")
    return ClassificationSet(images, labels, classnames)


def clip_benchmark_classnames(name: str) -> list[str]:
    """CLIP_benchmark's English class names for `name` (its en_classnames.json), in class-index order."""
    names = json.loads(CLIP_BENCHMARK_CLASSNAMES.read_text(encoding="utf-8"))
    if name not in names:
        raise BenchmarkError(f"{CLIP_BENCHMARK_CLASSNAMES} has no class names for {name!r}; it has "
                             f"{', '.join(names)}")
    return names[name]


def templates(name: str) -> list[str]:
    """CLIP_benchmark's zero-shot templates for `name` (its en_zeroshot_classification_templates.json), each with
    a `{c}` placeholder for the class name, as metrics.load_templates and zeroshot_classifier expect."""
    known = json.loads(CLIP_BENCHMARK_TEMPLATES.read_text(encoding="utf-8"))
    if name not in known:
        raise BenchmarkError(f"{CLIP_BENCHMARK_TEMPLATES} has no templates for {name!r}; it has {', '.join(known)}")
    return load_templates(dataset=name)


# ----------------------------------------------------------------------------- ImageNet-1k

def read_imagenet1k(root: str) -> ClassificationSet:
    """ImageNet-1k validation: image i of synset folder k has label k, k the wnid's rank in sorted order, the
    files of each folder in sorted order (torchvision's ImageNet(split="val"), an ImageFolder over val/:
    `folder.py` find_classes and make_dataset); OpenAI's 1,000 class names from CLIP_benchmark's en_classnames.json
    ("imagenet1k"), as build_dataset sets them. Folders other than the 1,000 synsets are ignored."""
    val = locate(root, "imagenet1k")
    wnids = IMAGENET_WNIDS.read_text().split()
    images, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = os.path.join(val, wnid)
        if not os.path.isdir(folder):
            raise BenchmarkError(f"imagenet1k: {folder} not found (one of the 1,000 class folders); expected "
                                 f"{LAYOUTS['imagenet1k']}")
        for directory, _, files in sorted(os.walk(folder, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    images.append(os.path.join(directory, file))
                    labels.append(label)
    return checked("imagenet1k", val, images, labels, clip_benchmark_classnames("imagenet1k"))


# ----------------------------------------------------------------------------- CIFAR

class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's python pickles hold (dicts, lists, strings, ints and NumPy arrays): any other
    global, the way a pickle runs code, is refused. encoding="latin1" reads their Python-2 strings, as torchvision's
    CIFAR10 does (the array bytes included, which NumPy's _reconstruct accepts as latin-1 text)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR pickle")
        return super().find_class(module, name)


def load_cifar_pickle(path: str, keys: tuple[str, ...], name: str) -> dict:
    """The dict a CIFAR pickle holds, checked to have `keys`; BenchmarkError naming the file otherwise."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"{name}: {path} not found; expected {LAYOUTS[name]}")
    try:
        with open(path, "rb") as f:
            entry = CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise BenchmarkError(f"{path} is not CIFAR's python pickle ({err}); expected {LAYOUTS[name]}") from None
    missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
    if missing:
        raise BenchmarkError(f"{path} has no {missing[0]!r} entry; expected {LAYOUTS[name]}")
    return entry


def read_cifar(root: str, name: str, test_file: str, meta_file: str, labels_key: str,
               names_key: str) -> ClassificationSet:
    """CIFAR's test pickle: `data` (N, 3072) uint8 rows, each the 1024 red, then green, then blue values of a
    32×32 image in row-major order, and the labels (torchvision's CIFAR10/CIFAR100, `cifar.py`, train=False:
    test_batch / test only); the class names are the meta pickle's, as written (CLIP_benchmark keeps them)."""
    folder = locate(root, name)
    test_path, meta_path = os.path.join(folder, test_file), os.path.join(folder, meta_file)
    entry = load_cifar_pickle(test_path, ("data", labels_key), name)
    classnames = load_cifar_pickle(meta_path, (names_key,), name)[names_key]
    data, labels = entry["data"], [int(label) for label in entry[labels_key]]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
            or len(labels) != len(data):
        raise BenchmarkError(f"{test_path}: 'data' must be (N, 3072) uint8 with N labels, got "
                             f"{getattr(data, 'shape', type(data))} and {len(labels)} labels; download it again")
    pixels = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
    images = [ArrayImage(pixels, index, test_path) for index in range(len(pixels))]
    return checked(name, meta_path, images, labels, list(classnames))


def read_cifar10(root: str) -> ClassificationSet:
    """CIFAR-10's 10,000 test images (see read_cifar); names from batches.meta's label_names."""
    return read_cifar(root, "cifar10", "test_batch", "batches.meta", "labels", "label_names")


def read_cifar100(root: str) -> ClassificationSet:
    """CIFAR-100's 10,000 test images with their fine labels (see read_cifar); names from meta's fine_label_names,
    underscores kept ("aquarium_fish"), as CLIP_benchmark prompts them."""
    return read_cifar(root, "cifar100", "test", "meta", "fine_labels", "fine_label_names")


# ----------------------------------------------------------------------------- the list-file releases

def read_food101(root: str) -> ClassificationSet:
    """Food-101's 25,250 test images: meta/test.json {class: ["class/id", ...]}, classes in sorted order, images in
    the file's order, each images/<class>/<id>.jpg (torchvision's Food101(split="test"), `food101.py`); names with
    '_' as spaces (build_dataset)."""
    folder = locate(root, "food101")
    path = os.path.join(folder, "meta", "test.json")
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"{path}:{err.lineno}: damaged JSON ({err.msg}); download the dataset again") from None
    if not isinstance(metadata, dict) or not all(isinstance(ids, list) and all(isinstance(i, str) for i in ids)
                                                 for ids in metadata.values()):
        raise BenchmarkError(f'{path} must hold {{"class": ["class/id", ...]}}; download the dataset again')
    classes = sorted(metadata)
    class_to_index = {name: index for index, name in enumerate(classes)}
    images, labels = [], []
    for name, ids in metadata.items():
        images += [os.path.join(folder, "images", *f"{image_id}.jpg".split("/")) for image_id in ids]
        labels += [class_to_index[name]] * len(ids)
    return checked("food101", path, images, labels, [name.replace("_", " ") for name in classes])


def read_sun397(root: str) -> ClassificationSet:
    """All 108,754 SUN397 images (CLIP_benchmark has no test split here): classes are ClassName.txt's lines
    "/a/abbey" less their first 3 characters, each image SUN397/<letter>/<class>/sun_*.jpg labelled by its folder
    path below the letter (torchvision's SUN397, `sun397.py`, which lists them unsorted: sorted here); names with
    '_' and '/' as spaces (build_dataset)."""
    folder = locate(root, "sun397")
    path = os.path.join(folder, "ClassName.txt")
    classes = []
    for number, line in numbered_lines(path, "sun397"):
        if not (line.startswith("/") and line[2:3] == "/" and line[3:].strip()):
            raise malformed(path, number, line, '"/<letter>/<class>", e.g. "/a/abbey"')
        classes.append(line[3:].strip())
    class_to_index = {name: index for index, name in enumerate(classes)}
    images, labels = [], []
    for image in sorted(Path(folder).rglob("sun_*.jpg")):
        class_path = "/".join(image.relative_to(folder).parts[1:-1])
        if class_path not in class_to_index:
            raise BenchmarkError(f"sun397: {image} is in folder {class_path!r}, which {path} does not list; "
                                 f"expected {LAYOUTS['sun397']}")
        images.append(str(image))
        labels.append(class_to_index[class_path])
    if not images:
        raise BenchmarkError(f"sun397: no sun_*.jpg image under {folder}; expected {LAYOUTS['sun397']}")
    names = [name.replace("_", " ").replace("/", " ") for name in classes]
    return checked("sun397", path, images, labels, names)


def read_fgvc_aircraft(root: str) -> ClassificationSet:
    """FGVC-Aircraft's 3,333 test images at the variant level: data/images_variant_test.txt "<id> <variant>", the
    image data/images/<id>.jpg, the label the variant's line in data/variants.txt (torchvision's
    FGVCAircraft(split="test", annotation_level="variant"), `fgvc_aircraft.py`); names as variants.txt writes them."""
    folder = os.path.join(locate(root, "fgvc_aircraft"), "data")
    variants_path = os.path.join(folder, "variants.txt")
    classes = [line.strip() for _, line in numbered_lines(variants_path, "fgvc_aircraft")]
    class_to_index = {name: index for index, name in enumerate(classes)}
    path = os.path.join(folder, "images_variant_test.txt")
    images, labels = [], []
    for number, line in numbered_lines(path, "fgvc_aircraft"):
        image_id, _, variant = line.strip().partition(" ")
        if variant not in class_to_index:
            raise malformed(path, number, line, f'"<image id> <variant>", the variant one of {variants_path}')
        images.append(os.path.join(folder, "images", f"{image_id}.jpg"))
        labels.append(class_to_index[variant])
    return checked("fgvc_aircraft", variants_path, images, labels, classes)


def read_dtd(root: str) -> ClassificationSet:
    """DTD's 1,880 test images of partition 1: labels/test1.txt "<class>/<file>", the image images/<class>/<file>,
    classes in sorted order (torchvision's DTD(split="test", partition=1), `dtd.py`); names the folder names."""
    folder = locate(root, "dtd")
    path = os.path.join(folder, "labels", "test1.txt")
    image_classes, images = [], []
    for number, line in numbered_lines(path, "dtd"):
        parts = line.strip().split("/")
        if len(parts) != 2 or not all(parts):
            raise malformed(path, number, line, '"<class>/<file>", e.g. "banded/banded_0002.jpg"')
        image_classes.append(parts[0])
        images.append(os.path.join(folder, "images", *parts))
    classes = sorted(set(image_classes))
    class_to_index = {name: index for index, name in enumerate(classes)}
    return checked("dtd", path, images, [class_to_index[name] for name in image_classes], classes)


def read_pets(root: str) -> ClassificationSet:
    """Oxford-IIIT Pet's 3,669 test images: annotations/test.txt "<image id> <class id> <species> <breed id>",
    the image images/<image id>.jpg, the label class id − 1, the name of each label its image ids' breed prefix
    with '_' as spaces and each word capitalised ("american_pit_bull_terrier_1" → "American Pit Bull Terrier";
    torchvision's OxfordIIITPet(split="test", target_types="category"), `oxford_iiit_pet.py`)."""
    folder = locate(root, "pets")
    path = os.path.join(folder, "annotations", "test.txt")
    images, labels, breeds = [], [], set()
    for number, line in numbered_lines(path, "pets"):
        fields = line.split()
        if len(fields) != 4 or not fields[1].isdigit() or int(fields[1]) < 1:
            raise malformed(path, number, line, '"<image id> <class id from 1> <species> <breed id>"')
        images.append(os.path.join(folder, "images", f"{fields[0]}.jpg"))
        labels.append(int(fields[1]) - 1)
        breeds.add((fields[0].rsplit("_", 1)[0], labels[-1]))
    ordered = sorted(breeds, key=lambda breed_and_label: breed_and_label[1])  # by label, as torchvision
    classnames = [" ".join(part.title() for part in breed.split("_")) for breed, _ in ordered]
    if [label for _, label in ordered] != list(range(len(ordered))):
        raise BenchmarkError(f"{path}: the class ids must run 1, 2, ... with one breed each; download the "
                             f"annotations again")
    return checked("pets", path, images, labels, classnames)


def read_caltech101(root: str) -> ClassificationSet:
    """All Caltech-101 images (CLIP_benchmark has no test split here), BACKGROUND_Google kept as a class: the
    class folders of 101_ObjectCategories/ in sorted order (BACKGROUND_Google, Faces, Faces_easy, Leopards,
    Motorbikes, accordion, ...), and in folder k the images image_0001.jpg ... image_<n>.jpg, n its number of .jpg
    files (CLIP_benchmark's own `clip_benchmark/datasets/caltech101.py`, torchvision's with the background class
    left in); the 102 names of en_classnames.json ("caltech101": background, off-center face, centered face, ...)."""
    folder = locate(root, "caltech101")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        count = len(glob.glob(os.path.join(glob.escape(os.path.join(folder, name)), "*.jpg")))
        images += [os.path.join(folder, name, f"image_{number:04d}.jpg") for number in range(1, count + 1)]
        labels += [label] * count
    dataset = checked("caltech101", folder, images, labels, classes)  # 102 folders, as many as the names below
    dataset.classnames = clip_benchmark_classnames("caltech101")  # CLIP_benchmark's name of each, in this order
    return dataset


def read_cars(root: str) -> ClassificationSet:
    """Stanford Cars' 8,041 test images as torchvision's StanfordCars(split="test") reads them (CLIP_benchmark
    "cars"): cars_test_annos_withlabels.mat's `annotations` (fname, class from 1) → cars_test/<fname>, label
    class − 1; the names are devkit/cars_meta.mat's `class_names` (CLIP_benchmark keeps torchvision's)."""
    folder = locate(root, "cars")
    meta, annotations = os.path.join(folder, "devkit", "cars_meta.mat"), os.path.join(folder, "cars_test_annos_withlabels.mat")
    if not os.path.isfile(annotations):
        raise BenchmarkError(f"cars: {annotations} not found; expected {LAYOUTS['cars']}")
    try:
        classnames = [str(name[0]) for name in read_mat(meta)["class_names"].ravel(order="F")]
        rows = read_mat(annotations)["annotations"].ravel(order="F")
        images = [os.path.join(folder, "cars_test", str(row["fname"][0])) for row in rows]
        labels = [int(row["class"].ravel()[0]) - 1 for row in rows]
    except (KeyError, IndexError, TypeError) as err:
        raise BenchmarkError(f"cars: {meta} or {annotations} lacks {err}; expected {LAYOUTS['cars']}") from None
    return checked("cars", meta, images, labels, classnames)


def read_flowers(root: str) -> ClassificationSet:
    """Flowers102's 6,149 test images as torchvision's Flowers102(split="test") reads them: setid.mat's `tstid`
    image ids → jpg/image_<id:05d>.jpg, label imagelabels.mat's `labels`[id − 1] − 1; CLIP_benchmark's names."""
    folder = locate(root, "flowers")
    labels_path, setid = os.path.join(folder, "imagelabels.mat"), os.path.join(folder, "setid.mat")
    if not os.path.isfile(labels_path):
        raise BenchmarkError(f"flowers: {labels_path} not found; expected {LAYOUTS['flowers']}")
    try:
        test_ids = [int(i) for i in read_mat(setid)["tstid"].ravel()]
        all_labels = [int(label) - 1 for label in read_mat(labels_path)["labels"].ravel()]
        labels = [all_labels[i - 1] for i in test_ids]
    except (KeyError, IndexError) as err:
        raise BenchmarkError(f"flowers: {setid} or {labels_path} lacks {err}; expected {LAYOUTS['flowers']}") from None
    images = [os.path.join(folder, "jpg", f"image_{i:05d}.jpg") for i in test_ids]
    return checked("flowers", setid, images, labels, clip_benchmark_classnames("flowers"))


CLASSIFICATION_READERS = {"imagenet1k": read_imagenet1k, "cifar10": read_cifar10, "cifar100": read_cifar100,
                          "food101": read_food101, "sun397": read_sun397, "fgvc_aircraft": read_fgvc_aircraft,
                          "dtd": read_dtd, "pets": read_pets, "caltech101": read_caltech101, "cars": read_cars,
                          "flowers": read_flowers}
