"""The zero-shot classification readers (miniproclip/benchmarks/classification.py) on tiny replicas of each layout.

Each test writes the release's real file names with every class listed, a non-test part that must be left out and a
few tiny images (others left missing: listed anyway, the runner skips them), then checks the exact images, labels
and class names written out here, with the dataset folder and its parent as root. Where clip_benchmark is installed
(pip install --no-deps clip-benchmark==1.6.2) its own build_dataset(name, split="test") reads the same replica and
must give the same images, labels and classes: the reference the paper's numbers come from.
"""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from miniproclip.benchmarks.classification import (CLASSIFICATION_READERS, CLIP_BENCHMARK_CLASSNAMES, FOLDERS,
                                                   IMAGENET_WNIDS, LAYOUTS, NUM_CLASSES, clip_benchmark_classnames,
                                                   templates)
from miniproclip.errors import BenchmarkError
from miniproclip.evaluation import ImageFiles
from miniproclip.image import ImageTransform, load_image
from miniproclip.metrics import CLIP_BENCHMARK_TEMPLATES, load_templates

NAMES = ["imagenet1k", "cifar10", "cifar100", "food101", "sun397", "fgvc_aircraft", "dtd", "pets", "caltech101", "cars",
         "flowers"]
# sha256 of CLIP_benchmark's two JSON files (commit 48de38c of LAION-AI/CLIP_benchmark = PyPI clip-benchmark 1.6.2)
SHA256 = {CLIP_BENCHMARK_CLASSNAMES: "73d279021a4bc88059884d01fae66c35ec33793ede8bc9ae54c46632625c4993",
          CLIP_BENCHMARK_TEMPLATES: "b78cc883ce1d6aefd304f180046ee25e778d627e099222fbcc57f01657c53c31"}
CAT_BREEDS = {"Abyssinian", "Bengal", "Birman", "Bombay", "British Shorthair", "Egyptian Mau", "Maine Coon", "Persian",
              "Ragdoll", "Russian Blue", "Siamese", "Sphynx"}  # capitalised in the release's image ids
CALTECH_FOLDERS = (  # 101_ObjectCategories/ as released, sorted as os.listdir + sorted gives them
    "BACKGROUND_Google Faces Faces_easy Leopards Motorbikes accordion airplanes anchor ant barrel bass beaver "
    "binocular bonsai brain brontosaurus buddha butterfly camera cannon car_side ceiling_fan cellphone chair "
    "chandelier cougar_body cougar_face crab crayfish crocodile crocodile_head cup dalmatian dollar_bill dolphin "
    "dragonfly electric_guitar elephant emu euphonium ewer ferry flamingo flamingo_head garfield gerenuk gramophone "
    "grand_piano hawksbill headphone hedgehog helicopter ibis inline_skate joshua_tree kangaroo ketch lamp laptop "
    "llama lobster lotus mandolin mayfly menorah metronome minaret nautilus octopus okapi pagoda panda pigeon pizza "
    "platypus pyramid revolver rhino rooster saxophone schooner scissors scorpion sea_horse snoopy soccer_ball "
    "stapler starfish stegosaurus stop_sign strawberry sunflower tick trilobite umbrella watch water_lilly "
    "wheelchair wild_cat windsor_chair wrench yin_yang").split()


def write_image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 3), (10, 200, 10)).save(path, format="JPEG")


def write_text(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def read_both(name, folder):
    """The reader's result from the dataset folder and from its parent, which must agree (CIFAR's ArrayImages
    compare by name)."""
    dataset = CLASSIFICATION_READERS[name](str(folder))
    again = CLASSIFICATION_READERS[name](str(folder.parent))
    assert [str(image) for image in again.images] == [str(image) for image in dataset.images]
    assert (again.labels, again.classnames) == (dataset.labels, dataset.classnames)
    return dataset


def clip_benchmark_dataset(name, root, monkeypatch=None):
    """CLIP_benchmark's own dataset object for the replica (skips where clip_benchmark is not installed)."""
    builder = pytest.importorskip("clip_benchmark.datasets.builder", reason="pip install --no-deps clip-benchmark")
    if monkeypatch is not None:  # torchvision's CIFAR checks the real files' md5 sums
        import torchvision.datasets.cifar as cifar
        monkeypatch.setattr(cifar, "check_integrity", lambda *args: True)
        monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    return builder.build_dataset(name, root=str(root), split="test", download=False)


def assert_same_as_clip_benchmark(dataset, reference, paths, targets):
    assert [str(path) for path in paths] == dataset.images
    assert list(targets) == dataset.labels
    assert list(reference.classes) == dataset.classnames


# ----------------------------------------------------------------------------- tables, names and templates

def test_tables_name_every_benchmark_and_assets_are_clip_benchmarks_files():
    assert list(CLASSIFICATION_READERS) == NAMES == list(LAYOUTS) == list(FOLDERS) == list(NUM_CLASSES)
    for path, digest in SHA256.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    try:
        import clip_benchmark.datasets as package
        from clip_benchmark.datasets.builder import all_imagenet_wordnet_ids
    except ImportError:
        return
    assert IMAGENET_WNIDS.read_text().split() == all_imagenet_wordnet_ids  # the shipped list is builder.py's
    for path in SHA256:  # byte-identical to the installed package's own copy
        assert path.read_bytes() == open(os.path.join(os.path.dirname(package.__file__), path.name), "rb").read()


def test_templates_are_clip_benchmarks_per_dataset():
    counts = {name: len(templates(name)) for name in NAMES}
    assert counts == {"imagenet1k": 80, "cifar10": 18, "cifar100": 18, "food101": 1, "sun397": 2,
                      "fgvc_aircraft": 2, "dtd": 8, "pets": 1, "caltech101": 34, "cars": 8, "flowers": 1}
    assert templates("imagenet1k") == load_templates()  # OpenAI's 80, the default of eval.py, one source
    assert templates("food101") == ["a photo of {c}, a type of food."]
    assert templates("fgvc_aircraft")[1] == "a photo of the {c}, a type of aircraft."
    assert all(t.format(c="X").count("X") == 1 for name in NAMES for t in templates(name))
    with pytest.raises(BenchmarkError, match="has no templates for 'food-101'; it has cifar10, cifar100"):
        templates("food-101")


@pytest.mark.parametrize("name", NAMES)
def test_missing_dataset_names_the_file_the_layout_and_the_source(tmp_path, name):
    subfolders, marker = FOLDERS[name]
    with pytest.raises(BenchmarkError) as error:
        CLASSIFICATION_READERS[name](str(tmp_path))
    assert str(error.value) == f"{name}: {tmp_path / subfolders[0] / marker} not found; expected {LAYOUTS[name]}"
    assert "\n" not in str(error.value) and " from " in LAYOUTS[name]


# ----------------------------------------------------------------------------- ImageNet-1k

def test_imagenet1k_val_folders_in_wnid_order_with_openai_names(tmp_path):
    val = tmp_path / "imagenet" / "val"
    wnids = IMAGENET_WNIDS.read_text().split()
    assert len(wnids) == 1000 == len(set(wnids)) and wnids == sorted(wnids) and wnids[0] == "n01440764"
    for wnid in wnids:
        os.makedirs(val / wnid)
        (val / wnid / f"ILSVRC2012_val_{wnid}.JPEG").write_bytes(b"")  # ImageFolder needs one file per class
    write_image(val / "n01440764" / "ILSVRC2012_val_00000293.JPEG")
    write_text(val / "n01440764" / "notes.txt", ["not an image"])
    write_image(val / "n15075141" / "sub" / "ILSVRC2012_val_00000001.png")  # os.walk goes into subfolders
    write_image(tmp_path / "imagenet" / "train" / "n01440764" / "n01440764_10026.JPEG")  # train: left out
    dataset = read_both("imagenet1k", val)
    assert dataset.images[:2] == [str(val / "n01440764" / name) for name in
                                  ("ILSVRC2012_val_00000293.JPEG", "ILSVRC2012_val_n01440764.JPEG")]
    assert dataset.images[-2:] == [str(val / "n15075141" / name) for name in
                                   ("ILSVRC2012_val_n15075141.JPEG", "sub/ILSVRC2012_val_00000001.png")]
    assert len(dataset.images) == 1002 and dataset.labels[:3] == [0, 0, 1] and dataset.labels[-2:] == [999, 999]
    names = dataset.classnames
    assert names == clip_benchmark_classnames("imagenet1k") and (names[0], names[999]) == ("tench", "toilet paper")

    reference = clip_benchmark_dataset("imagenet1k-unverified", tmp_path / "imagenet")  # ImageFolder over val/
    assert_same_as_clip_benchmark(dataset, reference, *zip(*reference.samples))

    os.rename(val / "n01443537", tmp_path / "aside")
    with pytest.raises(BenchmarkError, match=f"imagenet1k: {val / 'n01443537'} not found .*ILSVRC2012_img_val.tar"):
        CLASSIFICATION_READERS["imagenet1k"](str(val))


# ----------------------------------------------------------------------------- CIFAR

class Python2Array:
    """Pickles as a NumPy array written by Python 2 (CIFAR's files): its bytes as a latin-1 string."""

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        state = (1, self.array.shape, self.array.dtype, False, self.array.tobytes().decode("latin1"))
        return _reconstruct, (np.ndarray, (0,), "b"), state


def write_pickle(path, entry):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    entry = {key: Python2Array(value) if isinstance(value, np.ndarray) else value for key, value in entry.items()}
    # protocol 2 as the release; NumPy 1's module name, which the release's pickles carry
    data = pickle.dumps(entry, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    with open(path, "wb") as f:
        f.write(data)


def cifar_rows(images):
    """(N, 32, 32, 3) RGB -> CIFAR's (N, 3072) rows: the red plane, then green, then blue, each row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1).copy()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_test_pickle_streams_exact_pixels(tmp_path, monkeypatch, name):
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    train = generator.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    if name == "cifar10":
        folder, test_file, meta_file = tmp_path / "cifar-10-batches-py", "test_batch", "batches.meta"
        classnames = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        write_pickle(folder / test_file, {"batch_label": "testing batch 1 of 1", "labels": [3, 8, 8, 0, 6],
                                          "data": cifar_rows(images), "filenames": [f"{i}.png" for i in range(5)]})
        write_pickle(folder / "data_batch_1", {"labels": [1, 1, 1], "data": cifar_rows(train)})  # train: left out
        write_pickle(folder / meta_file, {"num_cases_per_batch": 10000, "label_names": classnames, "num_vis": 3072})
        labels = [3, 8, 8, 0, 6]
    else:
        folder, test_file, meta_file = tmp_path / "cifar-100-python", "test", "meta"
        classnames = ["apple", "aquarium_fish"] + [f"fine_{i}" for i in range(98)]
        write_pickle(folder / test_file, {"filenames": [f"{i}.png" for i in range(5)], "batch_label": "testing",
                                          "fine_labels": [49, 33, 72, 51, 1], "coarse_labels": [10, 10, 0, 4, 1],
                                          "data": cifar_rows(images)})
        write_pickle(folder / "train", {"fine_labels": [0, 0, 0], "coarse_labels": [0] * 3, "data": cifar_rows(train)})
        write_pickle(folder / meta_file, {"fine_label_names": classnames, "coarse_label_names": ["c"] * 20})
        labels = [49, 33, 72, 51, 1]  # the fine labels
    dataset = read_both(name, folder)
    assert [str(image) for image in dataset.images] == [f"{folder / test_file}[{i}]" for i in range(5)]
    assert dataset.labels == labels and dataset.classnames == classnames
    for index in range(5):  # each image decodes to the exact pixels written, one at a time
        assert np.array_equal(np.asarray(load_image(dataset.images[index])), images[index])
    transform = ImageTransform()
    _, pixels = ImageFiles(dataset.images, transform)[4]  # the runner's dataset reads them as files
    torch.testing.assert_close(pixels, transform(Image.fromarray(images[4])), rtol=0, atol=0)

    reference = clip_benchmark_dataset(name, tmp_path, monkeypatch)
    assert np.array_equal(reference.data, np.stack([dataset.images[i].pixels[i] for i in range(5)]))
    assert reference.targets == dataset.labels and reference.classes == dataset.classnames


class RunsCode:
    def __reduce__(self):
        return os.system, ("touch ran",)


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    monkeypatch.chdir(tmp_path)
    os.makedirs(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": RunsCode(), "labels": []}, protocol=2))
    with pytest.raises(BenchmarkError, match=r"test_batch is not CIFAR's python pickle \(global posix.system is "
                                             r"not allowed in a CIFAR pickle\); expected cifar-10-batches-py/"):
        CLASSIFICATION_READERS["cifar10"](str(tmp_path))
    assert not (tmp_path / "ran").exists()
    write_pickle(folder / "test_batch", {"labels": [0]})
    with pytest.raises(BenchmarkError, match=r"test_batch has no 'data' entry; expected cifar-10-batches-py/"):
        CLASSIFICATION_READERS["cifar10"](str(tmp_path))


# ----------------------------------------------------------------------------- the list-file releases

def test_food101_test_json(tmp_path):
    folder = tmp_path / "food-101"
    classes = ["apple_pie", "baby_back_ribs"] + [f"dish_{i:03d}" for i in range(99)]
    test = {name: [f"{name}/{100 + i}"] for i, name in enumerate(classes)}
    test["apple_pie"].append("apple_pie/1011328")
    test = {"baby_back_ribs": test.pop("baby_back_ribs")} | test  # images in the file's order, labels by sorted name
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "test.json").write_text(json.dumps(test))
    (folder / "meta" / "train.json").write_text(json.dumps({"apple_pie": ["apple_pie/1"]}))  # train: left out
    write_text(folder / "meta" / "classes.txt", classes)
    write_image(folder / "images" / "apple_pie" / "1011328.jpg")
    dataset = read_both("food101", folder)
    images = folder / "images"
    assert dataset.images[:3] == [str(images / "baby_back_ribs" / "101.jpg"), str(images / "apple_pie" / "100.jpg"),
                                  str(images / "apple_pie" / "1011328.jpg")]
    assert len(dataset.images) == 102 and dataset.labels[:4] == [1, 0, 0, 2] and dataset.labels[-1] == 100
    assert dataset.classnames[:3] == ["apple pie", "baby back ribs", "dish 000"] and len(dataset.classnames) == 101

    reference = clip_benchmark_dataset("food101", tmp_path)
    assert_same_as_clip_benchmark(dataset, reference, reference._image_files, reference._labels)

    (folder / "meta" / "test.json").write_text('{"apple_pie":\n ["apple_pie/1",]}')
    with pytest.raises(BenchmarkError, match=f"{folder / 'meta' / 'test.json'}:2: damaged JSON"):
        CLASSIFICATION_READERS["food101"](str(folder))


@pytest.mark.filterwarnings("ignore:split argument ignored")  # CLIP_benchmark: no test split
def test_sun397_every_image_labelled_by_its_folder(tmp_path):
    folder = tmp_path / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor"] + [f"/z/class_{i:03d}" for i in range(395)]
    write_text(folder / "ClassName.txt", classes)
    write_text(folder / "README.txt", ["SUN397"])
    for path in ("a/apartment_building/outdoor/sun_bbb.jpg", "a/abbey/sun_aaa.jpg", "z/class_394/sun_zzz.jpg"):
        write_image(folder / path)
    write_image(folder / "a" / "abbey" / "thumbnail.jpg")  # not sun_*.jpg: left out, as torchvision's rglob does
    dataset = read_both("sun397", folder)
    assert dataset.images == [str(folder / "a" / "abbey" / "sun_aaa.jpg"),
                              str(folder / "a" / "apartment_building" / "outdoor" / "sun_bbb.jpg"),
                              str(folder / "z" / "class_394" / "sun_zzz.jpg")]
    assert dataset.labels == [0, 1, 396] and len(dataset.classnames) == 397
    assert dataset.classnames[:3] == ["abbey", "apartment building outdoor", "class 000"]

    reference = clip_benchmark_dataset("sun397", tmp_path)
    assert_same_as_clip_benchmark(dataset, reference, *zip(*sorted(zip(reference._image_files, reference._labels))))

    write_image(folder / "b" / "bakery" / "sun_ccc.jpg")
    with pytest.raises(BenchmarkError, match=r"sun_ccc.jpg is in folder 'bakery', which .*ClassName.txt does not"):
        CLASSIFICATION_READERS["sun397"](str(folder))


def test_fgvc_aircraft_variant_test_list(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "727-200", "Cessna 172", "F/A-18"] + [f"variant {i}" for i in range(96)]
    write_text(data / "variants.txt", variants)
    write_text(data / "images_variant_test.txt", ["1514522 707-320", "0062765 Cessna 172", "2235434 F/A-18",
                                                  "0056978 variant 95"])
    write_text(data / "images_variant_trainval.txt", ["1025794 727-200"])  # trainval: left out
    write_text(data / "images_family_test.txt", ["1514522 Boeing 707"])  # another annotation level: left out
    write_image(data / "images" / "1514522.jpg")
    dataset = read_both("fgvc_aircraft", data.parent)
    assert dataset.images == [str(data / "images" / f"{i}.jpg") for i in ("1514522", "0062765", "2235434", "0056978")]
    assert dataset.labels == [0, 2, 3, 99] and dataset.classnames == variants

    reference = clip_benchmark_dataset("fgvc_aircraft", tmp_path)
    assert_same_as_clip_benchmark(dataset, reference, reference._image_files, reference._labels)


def test_dtd_partition_one_test_list(tmp_path):
    folder = tmp_path / "dtd" / "dtd"  # torchvision's root/dtd/ around the release's dtd/
    classes = ["banded", "blotchy"] + [f"texture{i:02d}" for i in range(45)]
    lines = [f"{name}/{name}_0002.jpg" for name in reversed(classes)] + ["banded/banded_0004.jpg"]
    write_text(folder / "labels" / "test1.txt", lines)
    write_text(folder / "labels" / "train1.txt", ["blotchy/blotchy_0001.jpg"])  # train: left out
    write_text(folder / "labels" / "test2.txt", ["blotchy/blotchy_0003.jpg"])  # partition 2: left out
    write_image(folder / "images" / "banded" / "banded_0002.jpg")
    dataset = read_both("dtd", folder)
    assert dataset.images == [str(folder / "images" / line) for line in lines]
    assert dataset.labels == list(range(46, -1, -1)) + [0] and dataset.classnames == classes
    assert CLASSIFICATION_READERS["dtd"](str(tmp_path)).images == dataset.images  # the folder above torchvision's

    reference = clip_benchmark_dataset("dtd", tmp_path)
    assert_same_as_clip_benchmark(dataset, reference, reference._image_files, reference._labels)


def test_pets_test_list_breed_names_are_clip_benchmarks(tmp_path):
    folder = tmp_path / "oxford-iiit-pet"
    names = clip_benchmark_classnames("pets")
    ids = [(name if name in CAT_BREEDS else name.lower()).replace(" ", "_") for name in names]
    lines = [f"{image_id}_{100 + k} {k + 1} {1 if names[k] in CAT_BREEDS else 2} {k % 25 + 1}"
             for k, image_id in reversed(list(enumerate(ids)))]
    write_text(folder / "annotations" / "test.txt", lines)
    write_text(folder / "annotations" / "trainval.txt", ["Abyssinian_100 1 1 1"])  # trainval: left out
    write_image(folder / "images" / "Abyssinian_100.jpg")
    dataset = read_both("pets", folder)
    assert dataset.images[-2:] == [str(folder / "images" / name) for name in
                                   ("american_bulldog_101.jpg", "Abyssinian_100.jpg")]
    assert dataset.labels == list(range(36, -1, -1)) and len(dataset.images) == 37
    assert dataset.classnames == names and names[2] == "American Pit Bull Terrier"  # derived = CLIP_benchmark's file

    reference = clip_benchmark_dataset("pets", tmp_path)
    assert_same_as_clip_benchmark(dataset, reference, reference._images, reference._labels)


@pytest.mark.filterwarnings("ignore:split argument ignored")  # CLIP_benchmark: no test split
def test_caltech101_every_image_background_kept(tmp_path):
    folder = tmp_path / "caltech101" / "101_ObjectCategories"
    assert len(CALTECH_FOLDERS) == 102 == len(set(CALTECH_FOLDERS)) and CALTECH_FOLDERS == sorted(CALTECH_FOLDERS)
    for name in CALTECH_FOLDERS:
        os.makedirs(folder / name)
    for path in ("BACKGROUND_Google/image_0001.jpg", "Faces_easy/image_0001.jpg", "Faces_easy/image_0002.jpg",
                 "car_side/image_0001.jpg", "yin_yang/image_0001.jpg"):
        write_image(folder / path)
    write_text(folder / "car_side" / "notes.txt", ["not a .jpg: not counted"])
    write_text(tmp_path / "caltech101" / "Annotations" / "Faces_3" / "annotation_0001.txt", ["x"])  # left out
    dataset = read_both("caltech101", folder)
    assert dataset.images == [str(folder / path) for path in ("BACKGROUND_Google/image_0001.jpg",
                              "Faces_easy/image_0001.jpg", "Faces_easy/image_0002.jpg", "car_side/image_0001.jpg",
                              "yin_yang/image_0001.jpg")]
    assert dataset.labels == [0, 2, 2, 20, 101] and dataset.classnames == clip_benchmark_classnames("caltech101")
    assert [dataset.classnames[label] for label in (0, 1, 2, 6, 20, 101)] == [
        "background", "off-center face", "centered face", "airplane", "side of a car", "yin and yang symbol"]
    assert CLASSIFICATION_READERS["caltech101"](str(tmp_path)).images == dataset.images  # CLIP_benchmark's root

    reference = clip_benchmark_dataset("caltech101", tmp_path)
    paths = [folder / reference.categories[y] / f"image_{i:04d}.jpg" for y, i in zip(reference.y, reference.index)]
    assert_same_as_clip_benchmark(dataset, reference, paths, reference.y)

    os.rmdir(folder / "wrench")
    with pytest.raises(BenchmarkError, match=f"caltech101: {folder} gives 101 classes, the release has 102; expected "
                                             f"101_ObjectCategories/"):
        CLASSIFICATION_READERS["caltech101"](str(folder))


# ----------------------------------------------------------------------------- damaged list files

@pytest.mark.parametrize("name, file, lines, message", [
    ("dtd", "dtd/labels/test1.txt", ["banded/banded_0002.jpg", "", "banded"],
     r"dtd/labels/test1.txt:3: malformed line 'banded'; expected \"<class>/<file>\""),
    ("pets", "oxford-iiit-pet/annotations/test.txt", ["Abyssinian_1 one 1 1"],
     r"test.txt:1: malformed line 'Abyssinian_1 one 1 1'; expected \"<image id> <class id from 1>"),
    ("fgvc_aircraft", "fgvc-aircraft-2013b/data/images_variant_test.txt", ["1514522 707-320", "0062765 A380"],
     r"images_variant_test.txt:2: malformed line '0062765 A380'; expected \"<image id> <variant>\", the variant "
     r"one of .*variants.txt"),
    ("sun397", "SUN397/ClassName.txt", ["/a/abbey", "abbey"], r"ClassName.txt:2: malformed line 'abbey'"),
    ("dtd", "dtd/labels/test1.txt", [f"class{i:02d}/x.jpg" for i in range(46)],
     r"dtd: .*test1.txt gives 46 classes, the release has 47; expected dtd/ with labels/test1.txt"),
])
def test_damaged_list_file_names_the_file_and_line(tmp_path, name, file, lines, message):
    write_text(tmp_path / file, lines)
    write_text(tmp_path / "fgvc-aircraft-2013b" / "data" / "variants.txt", ["707-320"])
    with pytest.raises(BenchmarkError, match=message):
        CLASSIFICATION_READERS[name](str(tmp_path))


def test_aircraft_without_its_variants_file(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    write_text(data / "images_variant_test.txt", ["1514522 707-320"])
    with pytest.raises(BenchmarkError) as error:
        CLASSIFICATION_READERS["fgvc_aircraft"](str(tmp_path))
    assert str(error.value) == f"fgvc_aircraft: {data / 'variants.txt'} not found; expected {LAYOUTS['fgvc_aircraft']}"


# ----------------------------------------------------------------------------- Stanford Cars, Flowers102 (.mat files)

def test_cars_test_annotations_from_the_mat_files(tmp_path):
    """torchvision's StanfordCars layout: the test annotations' fname/class, cars_meta's names (scipy writes them)."""
    sio = pytest.importorskip("scipy.io")
    folder = tmp_path / "stanford_cars"
    names = [f"Make {i} Model {2000 + i}" for i in range(196)]
    os.makedirs(folder / "devkit")
    sio.savemat(folder / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    rows = [("00003.jpg", 196), ("00001.jpg", 1), ("00002.jpg", 57)]
    annotations = np.zeros((1, len(rows)), dtype=[("bbox_x1", "O"), ("class", "O"), ("fname", "O")])
    for i, (fname, cls) in enumerate(rows):
        annotations[0, i] = (np.array([[30]], dtype=np.uint8), np.array([[cls]], dtype=np.uint8), fname)
    sio.savemat(folder / "cars_test_annos_withlabels.mat", {"annotations": annotations}, do_compression=True)
    sio.savemat(folder / "devkit" / "cars_train_annos.mat", {"annotations": annotations[:, :1]})  # train: left out
    write_image(folder / "cars_test" / "00001.jpg")
    dataset = read_both("cars", folder)
    assert dataset.images == [str(folder / "cars_test" / fname) for fname, _ in rows]
    assert dataset.labels == [195, 0, 56] and dataset.classnames == names

    reference = clip_benchmark_dataset("cars", tmp_path)
    paths, targets = zip(*reference._samples)
    assert_same_as_clip_benchmark(dataset, reference, paths, targets)


def test_flowers_test_ids_from_the_mat_files(tmp_path, monkeypatch):
    """torchvision's Flowers102 layout: setid.mat's tstid picks the images, imagelabels.mat labels them from 1."""
    sio = pytest.importorskip("scipy.io")
    folder = tmp_path / "flowers-102"
    os.makedirs(folder)
    labels = np.array([[77, 1, 102, 5, 5, 40]], dtype=np.uint8)  # images 1..6
    sio.savemat(folder / "imagelabels.mat", {"labels": labels})
    sio.savemat(folder / "setid.mat", {"trnid": np.array([[1, 2]], dtype=np.uint16), "valid": np.array([[3]]),
                                       "tstid": np.array([[6, 4, 3]], dtype=np.uint16)}, do_compression=True)
    for i in (6, 4, 3):  # CLIP_benchmark decodes the first test image (its label base check)
        write_image(folder / "jpg" / f"image_{i:05d}.jpg")
    dataset = read_both("flowers", folder)
    assert dataset.images == [str(folder / "jpg" / f"image_{i:05d}.jpg") for i in (6, 4, 3)]
    assert dataset.labels == [39, 4, 101] and dataset.classnames == clip_benchmark_classnames("flowers")

    import torchvision.datasets.flowers102 as flowers102
    monkeypatch.setattr(flowers102.Flowers102, "_check_integrity", lambda self: True)  # the real files' md5 sums
    reference = clip_benchmark_dataset("flowers", tmp_path)
    assert_same_as_clip_benchmark(dataset, reference, reference._image_files, reference._labels)
