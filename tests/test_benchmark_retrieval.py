"""The retrieval benchmark readers (miniproclip/benchmarks/retrieval.py) on tiny replicas of each released layout.

Each test writes the real file and field names, a non-test part that must be left out, and a few tiny images (some
left missing: the readers list them anyway, the runner skips them); it checks the exact images, captions and
caption -> image map against the convention of the cited evaluation code, with the dataset folder and its parent as
root, and the one-line errors for a missing dataset and a damaged file.
"""

import json
import os
import re

import pytest
from PIL import Image

from miniproclip.benchmarks import RetrievalSet
from miniproclip.benchmarks.retrieval import LAYOUTS, RETRIEVAL_READERS, XM3600_LANGUAGES, flame_dci_caption
from miniproclip.errors import BenchmarkError


def write_image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 3), (200, 10, 10)).save(path)


def write_json(path, value, lines=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in value) if lines else json.dumps(value, indent=1))


def read_both(name, folder, **options):
    """The reader's result from the dataset folder and from its parent, which must agree."""
    dataset = RETRIEVAL_READERS[name](str(folder), **options)
    assert RETRIEVAL_READERS[name](str(folder.parent), **options) == dataset
    return dataset


def karpathy_entry(filename, split, captions, filepath=None):
    sentences = [{"raw": caption, "tokens": caption.split()} for caption in captions]
    entry = {"filename": filename, "split": split, "imgid": 0, "sentences": sentences}
    return entry | ({"filepath": filepath} if filepath else {})


def test_reader_tables_name_every_benchmark():
    names = ["flickr30k", "coco", "sharegpt4v-1k", "urban1k", "docci", "dci", "xm3600"]
    assert list(RETRIEVAL_READERS) == names and list(LAYOUTS) == names
    assert len(XM3600_LANGUAGES) == 36 == len(set(XM3600_LANGUAGES))
    assert XM3600_LANGUAGES[:3] == ["ar", "bn", "cs"] and XM3600_LANGUAGES[-3:] == ["uk", "vi", "zh"]
    assert XM3600_LANGUAGES.index("fil") == 10 and XM3600_LANGUAGES.index("quz") == 25


def test_flickr30k_karpathy_and_blip(tmp_path):
    folder = tmp_path / "flickr30k"
    five = [f"A dog runs {i} . " for i in range(5)]  # Karpathy's raw sentences, trailing space kept
    write_json(folder / "dataset_flickr30k.json", {"images": [
        karpathy_entry("10.jpg", "train", ["a train caption"]), karpathy_entry("20.jpg", "test", five),
        karpathy_entry("30.jpg", "val", ["a val caption"]), karpathy_entry("40.jpg", "test", ["cat"] * 5)],
        "dataset": "flickr30k"})
    write_image(folder / "flickr30k-images" / "20.jpg")  # 40.jpg is missing: still listed
    dataset = read_both("flickr30k", folder)
    assert dataset == RetrievalSet([str(folder / "flickr30k-images" / "20.jpg"),
                                    str(folder / "flickr30k-images" / "40.jpg")],
                                   five + ["cat"] * 5, [0] * 5 + [1] * 5, "test")
    blip = tmp_path / "blip" / "flickr30k"  # BLIP's flickr30k_test.json, image paths relative to its folder
    write_json(blip / "flickr30k_test.json", [{"image": "flickr30k-images/20.jpg", "caption": five},
                                              {"image": "flickr30k-images/40.jpg", "caption": ["A cat."] * 5}])
    assert read_both("flickr30k", blip) == RetrievalSet(
        [str(blip / "flickr30k-images" / "20.jpg"), str(blip / "flickr30k-images" / "40.jpg")],
        five + ["A cat."] * 5, [0] * 5 + [1] * 5, "test")


def test_coco_every_caption_or_five(tmp_path):
    folder = tmp_path / "coco"
    seven = [f"caption {i}\n" for i in range(7)]
    write_json(folder / "dataset_coco.json", {"images": [
        karpathy_entry("COCO_val2014_1.jpg", "test", seven, "val2014"),
        karpathy_entry("COCO_val2014_2.jpg", "restval", ["restval"] * 5, "val2014"),
        karpathy_entry("COCO_train2014_3.jpg", "train", ["train"] * 5, "train2014"),
        karpathy_entry("COCO_val2014_4.jpg", "test", ["b"] * 5, "val2014")]})
    write_image(folder / "val2014" / "COCO_val2014_1.jpg")
    images = [str(folder / "val2014" / "COCO_val2014_1.jpg"), str(folder / "val2014" / "COCO_val2014_4.jpg")]
    assert read_both("coco", folder) == RetrievalSet(images, seven + ["b"] * 5, [0] * 7 + [1] * 5, "test")
    assert read_both("coco", folder, five_captions=True) == RetrievalSet(images, seven[:5] + ["b"] * 5,
                                                                         [0] * 5 + [1] * 5, "test")
    blip = tmp_path / "blip" / "coco"
    write_json(blip / "coco_karpathy_test.json", [{"image": "val2014/COCO_val2014_1.jpg", "caption": seven[:6]},
                                                  {"image": "val2014/COCO_val2014_4.jpg", "caption": ["b"] * 5}])
    images = [str(blip / "val2014" / "COCO_val2014_1.jpg"), str(blip / "val2014" / "COCO_val2014_4.jpg")]
    assert read_both("coco", blip).text_to_image == [0] * 6 + [1] * 5
    assert read_both("coco", blip, five_captions=True) == RetrievalSet(images, seven[:5] + ["b"] * 5,
                                                                       [0] * 5 + [1] * 5, "test")


def test_sharegpt4v_first_thousand(tmp_path):
    folder = tmp_path / "sharegpt4v"
    entries = [{"id": str(i), "image": f"coco/train2017/{i:012d}.jpg" if i % 2 else f"sam/images/sa_{i}.jpg",
                "conversations": [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                                  {"from": "gpt", "value": f"The image shows item {i}.\n\nIt is red."}]}
               for i in range(1001)]  # the 1,001st (i = 1000) is outside ShareGPT4V-1k
    write_json(folder / "share-captioner_coco_lcs_sam_1246k_1107.json", entries)
    write_image(folder / "sam" / "images" / "sa_0.jpg")
    dataset = read_both("sharegpt4v-1k", folder)
    assert dataset.images == [str(folder / entry["image"]) for entry in entries[:1000]]
    assert dataset.images[:2] == [str(folder / "sam/images/sa_0.jpg"), str(folder / "coco/train2017/000000000001.jpg")]
    assert dataset.texts == [f"The image shows item {i}.\n\nIt is red." for i in range(1000)]
    assert dataset.text_to_image == list(range(1000))
    write_json(folder / "share-captioner_coco_lcs_sam_1246k_1107.json", entries[:999])
    with pytest.raises(BenchmarkError, match="at least 1000 entries"):
        RETRIEVAL_READERS["sharegpt4v-1k"](str(folder))


def test_urban1k_first_line_in_number_order(tmp_path):
    folder = tmp_path / "Urban1k"
    for i in (1, 2, 10, 3):  # numeric order 1, 2, 3, 10 (not the string order 1, 10, 2, 3)
        (folder / "caption").mkdir(parents=True, exist_ok=True)
        (folder / "caption" / f"{i}.txt").write_text(f"Long caption {i}, line one.\nline two\nline three\n")
    write_image(folder / "image" / "1.jpg")
    (folder / "caption" / "notes.md").write_text("not a caption")
    dataset = read_both("urban1k", folder)
    assert dataset == RetrievalSet([str(folder / "image" / f"{i}.jpg") for i in (1, 2, 3, 10)],
                                   [f"Long caption {i}, line one.\n" for i in (1, 2, 3, 10)], [0, 1, 2, 3], "test")


def test_docci_test_rows_only(tmp_path):
    folder = tmp_path / "docci"
    rows = [{"example_id": f"{split}_{i}", "split": split, "image_file": f"{split}_{i}.jpg",
             "description": f"A {split} description {i}."} for i, split in
            enumerate(["train", "test", "qual_dev", "test", "qual_test", "train"])]
    write_json(folder / "docci_descriptions.jsonlines", rows, lines=True)
    write_image(folder / "images" / "test_1.jpg")
    assert read_both("docci", folder) == RetrievalSet(
        [str(folder / "images" / "test_1.jpg"), str(folder / "images" / "test_3.jpg")],
        ["A test description 1.", "A test description 3."], [0, 1], "test")


def test_dci_flame_caption_and_splits(tmp_path):
    parent = tmp_path / "data"
    folder = parent / "densely_captioned_images"
    splits = {"train": ["sa_1.json", "sa_2.json"], "valid": ["sa_3.json"], "test": ["sa_4.json"]}
    write_json(folder / "splits.json", splits)
    for n in range(1, 5):
        write_json(folder / "annotations" / f"sa_{n}.json", {
            "image": f"sa_{n}.jpg", "short_caption": f"Photo {n}. A cat on a mat",
            "extra_caption": "It is grey.\nThe mat is red. </s>  ...Done", "mask_data": {}, "mask_keys": []})
    write_image(folder / "photos" / "sa_4.jpg")
    # FLAME eval_dci.py: "{short}\n{extra}" cut at \n, </s> and every ".", stripped, empties dropped, ". "-joined
    caption = "Photo {n}. A cat on a mat. It is grey. The mat is red. Done"
    assert flame_dci_caption("Photo 1. A cat on a mat", "It is grey.\nThe mat is red. </s>  ...Done") == \
        caption.format(n=1)
    dataset = RETRIEVAL_READERS["dci"](str(folder))
    assert RETRIEVAL_READERS["dci"](str(parent)) == dataset  # FLAME's root: the folder holding the dataset
    assert dataset == RetrievalSet([str(folder / "photos" / f"sa_{n}.jpg") for n in range(1, 5)],
                                   [caption.format(n=n) for n in range(1, 5)], [0, 1, 2, 3], "all")
    assert read_both("dci", folder, split="test") == RetrievalSet([str(folder / "photos" / "sa_4.jpg")],
                                                                  [caption.format(n=4)], [0], "test")
    with pytest.raises(BenchmarkError, match=r"has no split 'val' \(it has: train, valid, test\)"):
        RETRIEVAL_READERS["dci"](str(folder), split="val")
    os.remove(folder / "annotations" / "sa_3.json")
    with pytest.raises(BenchmarkError, match=r"sa_3.json \(listed in .*splits.json\) not found"):
        RETRIEVAL_READERS["dci"](str(folder))


def test_xm3600_languages_and_captions(tmp_path):
    folder = tmp_path / "xm3600"

    def language(captions):
        return {"caption": captions, "caption/tokenized": captions, "caption/tokenized/lowercase": captions}

    rows = [{"image/key": "000411001ff7dd4f", "image/locale": "ar", "en": language(["a red car", "a car"]),
             "de": language(["ein rotes Auto"]), "fr": language([])},
            {"image/key": "00133ea2f7ea6e31", "image/locale": "bn", "en": language(["two dogs"]),
             "de": language(["zwei Hunde", "Hunde", "Tiere"]), "fr": language(["deux chiens"])}]
    write_json(folder / "captions.jsonl", rows, lines=True)
    write_image(folder / "images" / "000411001ff7dd4f.jpg")
    images = [str(folder / "images" / "000411001ff7dd4f.jpg"), str(folder / "images" / "00133ea2f7ea6e31.jpg")]
    assert read_both("xm3600", folder) == RetrievalSet(images, ["a red car", "two dogs"], [0, 1], "en")
    assert read_both("xm3600", folder, all_captions=True) == RetrievalSet(images, ["a red car", "a car", "two dogs"],
                                                                          [0, 0, 1], "en")
    assert read_both("xm3600", folder, language="de", all_captions=True) == RetrievalSet(
        images, ["ein rotes Auto", "zwei Hunde", "Hunde", "Tiere"], [0, 1, 1, 1], "de")
    assert read_both("xm3600", folder, language="fr") == RetrievalSet(images[1:], ["deux chiens"], [0], "fr")
    with pytest.raises(BenchmarkError, match=r"line 1 is malformed \(KeyError: 'ja'\)"):
        RETRIEVAL_READERS["xm3600"](str(folder), language="ja")
    with pytest.raises(BenchmarkError, match="unknown language 'xx'; use one of ar, bn, cs"):
        RETRIEVAL_READERS["xm3600"](str(folder), language="xx")


EXPECTED_FILE = {"flickr30k": "dataset_flickr30k.json", "coco": "dataset_coco.json",
                 "sharegpt4v-1k": "share-captioner_coco_lcs_sam_1246k_1107.json", "urban1k": "caption",
                 "docci": "docci_descriptions.jsonlines", "dci": "splits.json", "xm3600": "captions.jsonl"}


@pytest.mark.parametrize("name", list(RETRIEVAL_READERS))
def test_missing_dataset_names_the_file_layout_and_source(tmp_path, name):
    (tmp_path / "images").mkdir()  # a folder with something else in it
    with pytest.raises(BenchmarkError) as error:
        RETRIEVAL_READERS[name](str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"{name}: {tmp_path / EXPECTED_FILE[name]} not found")
    assert message.endswith(f"expected {LAYOUTS[name]}") and "\n" not in message


def test_damaged_json_names_file_and_line(tmp_path):
    docci = tmp_path / "docci" / "docci_descriptions.jsonlines"
    at_docci, at_karpathy = re.escape(str(docci)), re.escape(str(tmp_path / "coco" / "dataset_coco.json"))
    rows = [{"example_id": "a", "split": "test", "image_file": "a.jpg", "description": "A."}] * 2
    write_json(docci, rows, lines=True)
    with open(docci, "a") as f:
        f.write('\n{"example_id": "c", "split": "test", "image_file": "c.jpg", \n')  # line 3 blank, line 4 cut short
    with pytest.raises(BenchmarkError, match=rf"^{at_docci}:4: damaged JSON \(Expecting property name"):
        RETRIEVAL_READERS["docci"](str(tmp_path))
    write_json(docci, rows[:1] + [{"example_id": "b", "split": "test", "image_file": "b.jpg"}], lines=True)
    with pytest.raises(BenchmarkError, match=rf"^{at_docci}: line 2 is malformed \(KeyError: 'description'\)"):
        RETRIEVAL_READERS["docci"](str(tmp_path))
    karpathy = tmp_path / "coco" / "dataset_coco.json"
    karpathy.parent.mkdir()
    karpathy.write_text('{"images": [\n {"filename": "a.jpg",\n  "split": "test" "sentences": []}]}')
    with pytest.raises(BenchmarkError, match=rf"^{at_karpathy}:3: damaged JSON \(Expecting ',' delimiter, column 19\)"):
        RETRIEVAL_READERS["coco"](str(tmp_path))
    write_json(karpathy, {"images": [karpathy_entry("a.jpg", "test", ["a"]), {"filename": "b.jpg", "split": "test"}]})
    with pytest.raises(BenchmarkError, match=rf"^{at_karpathy}: test image 1 is malformed \(KeyError: 'sentences'\)"):
        RETRIEVAL_READERS["coco"](str(tmp_path))
