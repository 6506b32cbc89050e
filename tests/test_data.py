"""Tests for miniproclip/data.py and loader.py: every source format, malformed-row handling with exact messages,
unreadable images dropped in collate, and the batching contracts (determinism, DDP exactness, resume, worker invariance).

Pixels of solid PNGs are checked against the CLIP normalization computed by hand; images read from tar shards by
seek must equal the same bytes decoded directly.
"""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from miniproclip import data, loader
from miniproclip.data import DataError, Row, caption_texts, expand_braces, read_rows
from miniproclip.loader import ImageTextDataset, collate, epoch_batches, make_loader
from miniproclip.image import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform, RandomResizedCropTransform,
                               load_image)

TRANSFORM = ImageTransform(size=8, crop_size=(8, 8))  # tiny crops keep the tests fast
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def image_bytes(color=None, fmt="PNG", size=(20, 12)) -> bytes:
    """An encoded image: solid `color`, or seeded noise (so a JPEG has many bytes to truncate)."""
    if color is None:
        pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", size, color)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def solid_pixels(color) -> torch.Tensor:
    """(3, 8, 8) CLIP-normalized pixels of a solid color, computed by hand."""
    values = [(v / 255 - m) / s for v, m, s in zip(color, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    return torch.tensor(values, dtype=torch.float32)[:, None, None].expand(3, 8, 8)


def close(pixels, expected, tolerance=1e-6) -> bool:
    return pixels.shape == expected.shape and (pixels - expected).abs().max().item() <= tolerance


def write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def shards(tmp_path):
    """Two tar shards (captions from .txt and from .json) and the bytes of their images."""
    images = {"000000.jpg": image_bytes(None, "JPEG"), "000001.png": image_bytes(RED),
              "000002.png": image_bytes(GREEN), "000003.jpeg": image_bytes(BLUE, "JPEG")}
    write_tar(tmp_path / "shard-000.tar", {
        "000000.jpg": images["000000.jpg"], "000000.txt": b"noise\n", "000000.cls": b"7",
        "000001.png": images["000001.png"],
        "000001.json": json.dumps({"caption": "red", "long_caption": "a red rectangle"}).encode()})
    write_tar(tmp_path / "shard-001.tar", {
        "000002.txt": "vert \u00e9meraude".encode(), "000002.png": images["000002.png"],
        "000003.jpeg": images["000003.jpeg"], "000003.txt": b"blue"})
    return str(tmp_path / "shard-{000..001}.tar"), images


def test_expand_braces():
    assert expand_braces("/d/s-{008..011}.tar") == ["/d/s-008.tar", "/d/s-009.tar", "/d/s-010.tar", "/d/s-011.tar"]
    assert expand_braces("{a,b{1..2}}-{9..10}") == ["a-9", "a-10", "b1-9", "b1-10", "b2-9", "b2-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DataError, match=r"^s-\{0\.\.1\.tar: unbalanced"):
        expand_braces("s-{0..1.tar")


def test_jsonl_paths_relative_to_file(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes(image_bytes(RED))
    (tmp_path / "images" / "blue.jpg").write_bytes(image_bytes(BLUE, "JPEG"))
    (tmp_path / "meta").mkdir()
    source = write_lines(tmp_path / "meta" / "train.jsonl", [
        json.dumps({"image": "../images/red.png", "caption": " red ", "long_caption": "a red rectangle"}),
        "",
        json.dumps({"image": str(tmp_path / "images" / "blue.jpg"), "caption": "blue", "long_caption": None})])
    monkeypatch.chdir(tmp_path / "images")  # relative paths must not depend on the working directory
    rows = read_rows(source)
    assert list(rows) == [Row(str(tmp_path / "images" / "red.png"), "red", "a red rectangle"),
                    Row(str(tmp_path / "images" / "blue.jpg"), "blue", None)]
    dataset = ImageTextDataset(rows, TRANSFORM)
    red = dataset[0]
    assert red["index"] == 0 and red["caption"] == "red" and red["long_caption"] == "a red rectangle"
    assert close(red["pixels"], solid_pixels(RED))
    blue = dataset[1]["pixels"]
    assert close(blue, solid_pixels(BLUE), tolerance=0.05)  # JPEG is lossy


def test_csv_and_tsv(tmp_path):
    (tmp_path / "red.png").write_bytes(image_bytes(RED))
    csv_source = write_lines(tmp_path / "train.csv", [
        "filepath,title,long_caption", 'red.png,"a cat, sitting",', 'red.png,plain,"long, quoted"'])
    assert list(read_rows(csv_source)) == [Row(str(tmp_path / "red.png"), "a cat, sitting", None),
                                     Row(str(tmp_path / "red.png"), "plain", "long, quoted")]
    # tab by extension, custom keys, extra columns ignored
    tsv_source = write_lines(tmp_path / "train.tsv", ["id\timg\ttext", "1\tred.png\ta, b; c"])
    rows = read_rows(tsv_source, csv_img_key="img", csv_caption_key="text")
    assert list(rows) == [Row(str(tmp_path / "red.png"), "a, b; c", None)]
    semicolon_source = write_lines(tmp_path / "semi.csv", ["filepath;title", "red.png;x, y"])
    assert list(read_rows(semicolon_source, csv_separator=";")) == [Row(str(tmp_path / "red.png"), "x, y", None)]
    with pytest.raises(DataError) as error:
        read_rows(csv_source, csv_caption_key="caption")
    assert str(error.value) == (f"{csv_source}: no column 'caption' (header: ['filepath', 'title', 'long_caption'], "
                                f"separator ','): set caption_key (--csv-caption-key) or separator (--csv-separator)")


def test_tar_shards_with_braces_and_joined_sources(tmp_path, shards, monkeypatch):
    pattern, images = shards
    (tmp_path / "red.png").write_bytes(image_bytes(RED))
    jsonl = write_lines(tmp_path / "extra.jsonl", [json.dumps({"image": "red.png", "caption": "file red"})])
    rows = read_rows(f"{pattern}::{jsonl}")
    shard0, shard1 = str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")
    assert [(row.image, row.caption, row.long_caption) for row in rows] == [
        (f"tar://{shard0}#000000.jpg", "noise", None), (f"tar://{shard0}#000001.png", "red", "a red rectangle"),
        (f"tar://{shard1}#000002.png", "vert \u00e9meraude", None), (f"tar://{shard1}#000003.jpeg", "blue", None),
        (str(tmp_path / "red.png"), "file red", None)]
    # the recorded offsets point at the image bytes
    for row, name in zip(rows, images):
        tar_path, offset, size = row.tar_member
        with open(tar_path, "rb") as f:
            f.seek(offset)
            assert f.read(size) == images[name]
    # read by seek, with one open shard at a time so the least recently used one is closed and reopened
    monkeypatch.setattr(loader, "MAX_OPEN_SHARDS", 1)
    dataset = ImageTextDataset(rows, TRANSFORM)
    for index in [0, 2, 1, 3, 0]:
        assert torch.equal(dataset[index]["pixels"], TRANSFORM(load_image(io.BytesIO(images[list(images)[index]]))))
    assert len(dataset._shards) == 1
    assert close(dataset[1]["pixels"], solid_pixels(RED)) and close(dataset[4]["pixels"], solid_pixels(RED))
    # spawned workers get a pickled dataset: the open files stay behind
    assert torch.equal(pickle.loads(pickle.dumps(dataset))[3]["pixels"], dataset[3]["pixels"])


def test_malformed_jsonl_rows_skipped_or_strict(tmp_path):
    source = write_lines(tmp_path / "bad.jsonl", [
        '{"image": "a.png", "caption": "good one"}',
        '{not json',
        '{"image": "a.png"}',
        '{"image": "a.png", "caption": "  \\n "}',
        '{"image": "a.png", "caption": 5}',
        '["a.png", "x"]',
        '',
        '{"caption": "x"}',
        '{"image": "a.png", "caption": "ok", "long_caption": ["x"]}',
        '{"image": "b.png", "caption": "good two"}'])
    log = []
    rows = read_rows(source, log=log.append)
    assert [row.caption for row in rows] == ["good one", "good two"]
    assert log == [
        f"warning: skipping {source}:2: invalid JSON (Expecting property name enclosed in double quotes: "
        f"line 1 column 2 (char 1))",
        f'warning: skipping {source}:3: missing "caption"',
        f'warning: skipping {source}:4: empty "caption"',
        f'warning: skipping {source}:5: "caption" must be a string, got int',
        f"warning: skipping {source}:6: expected a JSON object, got list",
        f'warning: skipping {source}:8: missing "image"',
        f'warning: skipping {source}:9: "long_caption" must be a string, got list',
        f"warning: skipped 7 malformed rows in {source}"]
    with pytest.raises(DataError) as error:
        read_rows(source, strict=True)
    assert str(error.value) == (f"{source}:2: invalid JSON (Expecting property name enclosed in double quotes: "
                                f"line 1 column 2 (char 1))")


def test_warnings_capped_at_ten(tmp_path):
    source = write_lines(tmp_path / "many.jsonl", ['{"image": "a.png"}'] * 15 + ['{"image": "a.png", "caption": "x"}'])
    log = []
    assert len(read_rows(source, log=log.append)) == 1
    assert log[:10] == [f'warning: skipping {source}:{line}: missing "caption"' for line in range(1, 11)]
    assert log[10:] == [f"warning: skipped 15 malformed rows in {source}, the first 10 shown above"]


def test_malformed_csv_rows_with_physical_line_numbers(tmp_path):
    source = write_lines(tmp_path / "bad.csv", [
        "filepath,title", 'a.png,"two', 'lines"', "b.png,", "c.png", "d.png,ok,extra", ",no image", "e.png,fine"])
    log = []
    rows = read_rows(source, log=log.append)
    assert [row.caption for row in rows] == ["two\nlines", "fine"]
    assert log == [f'warning: skipping {source}:4: empty "title"',
                   f"warning: skipping {source}:5: expected 2 fields separated by ','",
                   f"warning: skipping {source}:6: expected 2 fields separated by ','",
                   f'warning: skipping {source}:7: empty "filepath"',
                   f"warning: skipped 4 malformed rows in {source}"]
    with pytest.raises(DataError) as error:
        read_rows(source, strict=True)
    assert str(error.value) == f'{source}:4: empty "title"'


def test_malformed_tar_samples(tmp_path):
    shard = str(tmp_path / "bad.tar")
    write_tar(shard, {"0.jpg": image_bytes(RED, "JPEG"), "1.txt": b"caption without image",
                      "2.jpg": image_bytes(RED, "JPEG"), "2.json": b"{bad",
                      "3.png": image_bytes(RED), "3.json": b'{"long_caption": "only long"}',
                      "4.png": image_bytes(RED), "4.txt": b"\xff\xfe",
                      "5.png": image_bytes(RED), "5.txt": b"the good one"})
    log = []
    rows = read_rows(shard, log=log.append)
    assert [(row.image, row.caption) for row in rows] == [(f"tar://{shard}#5.png", "the good one")]
    assert log == [
        f"warning: skipping {shard}:0: no caption member (0.txt or 0.json)",
        f"warning: skipping {shard}:1.txt: no image member (1.jpg/.jpeg/.png/.webp)",
        f"warning: skipping {shard}:2.json: unreadable caption (Expecting property name enclosed in double "
        f"quotes: line 1 column 2 (char 1))",
        f'warning: skipping {shard}:3.json: missing "caption"',
        f"warning: skipping {shard}:4.txt: unreadable caption ('utf-8' codec can't decode byte 0xff in "
        f"position 0: invalid start byte)",
        f"warning: skipped 5 malformed rows in {shard}"]
    with pytest.raises(DataError) as error:
        read_rows(shard, strict=True)
    assert str(error.value) == f"{shard}:0: no caption member (0.txt or 0.json)"


def test_unusable_sources(tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", ['{"image": "a.png"}', "[]"])
    with pytest.raises(DataError) as error:
        read_rows(bad, log=lambda line: None)
    assert str(error.value) == (f"{bad}: no valid image-caption rows (2 malformed skipped): "
                                f"see the format in miniproclip/data.py read_rows")
    empty = write_lines(tmp_path / "empty.csv", ["filepath,title"])
    with pytest.raises(DataError, match=r"empty\.csv: no valid image-caption rows \(0 malformed skipped\)"):
        read_rows(empty)
    write_tar(tmp_path / "s-0.tar", {"0.png": image_bytes(RED), "0.txt": b"x"})
    missing_shards = str(tmp_path / "s-{0..1}.tar")
    with pytest.raises(DataError) as error:
        read_rows(missing_shards)
    assert str(error.value) == f"{tmp_path / 's-1.tar'} does not exist: check the data path {missing_shards!r}"
    with pytest.raises(DataError, match=r"notes\.txt: unknown data format \.txt: use \.jsonl, \.csv, \.tsv or \.tar"):
        read_rows(write_lines(tmp_path / "notes.txt", ["x"]))
    (tmp_path / "fake.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(DataError, match=r"fake\.tar: not a readable uncompressed tar file"):
        read_rows(str(tmp_path / "fake.tar"))


@pytest.fixture
def bad_image_rows(tmp_path, shards):
    """Rows with good images and with corrupt, zero-byte, missing, truncated ones (files and tar members)."""
    pattern, _ = shards
    (tmp_path / "good.png").write_bytes(image_bytes(GREEN))
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not an image" * 10)
    (tmp_path / "empty.jpg").write_bytes(b"")
    noise = image_bytes(None, "JPEG", size=(64, 64))
    (tmp_path / "truncated.jpg").write_bytes(noise[: len(noise) // 2])
    write_tar(tmp_path / "bad-members.tar", {"0.png": b"\x89PNG garbage", "0.txt": b"corrupt member",
                                             "1.png": image_bytes(RED), "1.txt": b"good member"})
    names = ["good.png", "corrupt.jpg", "empty.jpg", "missing.jpg", "truncated.jpg"]
    jsonl = write_lines(tmp_path / "images.jsonl", [json.dumps({"image": name, "caption": name}) for name in names])
    rows = read_rows(f"{jsonl}::{tmp_path / 'bad-members.tar'}::{pattern}")
    return rows, tmp_path


@pytest.mark.parametrize("transform", [TRANSFORM, RandomResizedCropTransform(base=TRANSFORM)],
                         ids=["eval transform", "training crop (its own load: JPEG draft)"])
def test_bad_images_dropped_in_collate_and_reported(bad_image_rows, transform):
    """Both transforms; the training crop opens files itself and drafts the truncated 64×64 JPEG before it fails."""
    rows, folder = bad_image_rows
    # a shard that disappears after indexing (a lost disk) also gives bad images, not a crash
    write_tar(folder / "gone.tar", {"0.png": image_bytes(RED), "0.txt": b"gone"})
    rows = rows + read_rows(str(folder / "gone.tar"))
    (folder / "gone.tar").unlink()
    dataset = ImageTextDataset(rows, transform)
    batch = collate([dataset[index] for index in range(len(rows))])
    assert batch["bad_images"] == [str(folder / name) for name in ["corrupt.jpg", "empty.jpg", "missing.jpg",
                                                                   "truncated.jpg"]] + \
        [f"tar://{folder / 'bad-members.tar'}#0.png", f"tar://{folder / 'gone.tar'}#0.png"]
    assert batch["indices"] == [0, 6, 7, 8, 9, 10]
    assert batch["captions"] == ["good.png", "good member", "noise", "red", "vert \u00e9meraude", "blue"]
    assert batch["long_captions"] == [None, None, None, "a red rectangle", None, None]
    assert batch["pixels"].shape == (6, 3, 8, 8)
    assert close(batch["pixels"][0], solid_pixels(GREEN)) and close(batch["pixels"][1], solid_pixels(RED))
    assert close(batch["pixels"][3], solid_pixels(RED))
    all_bad = collate([dataset[1], dataset[2]])
    assert all_bad["pixels"] is None and all_bad["indices"] == [] and len(all_bad["bad_images"]) == 2


def test_captions_only_never_reads_images(tmp_path):
    rows = [Row(str(tmp_path / "missing.jpg"), "a", "long a"), Row(f"tar://{tmp_path}/none.tar#0.jpg", "b", None,
                                                                   (str(tmp_path / "none.tar"), 512, 100))]
    batch = collate([ImageTextDataset(rows)[i] for i in (1, 0)])
    assert batch == {"indices": [1, 0], "pixels": None, "captions": ["b", "a"], "long_captions": [None, "long a"],
                     "bad_images": []}


def test_caption_texts_unique_in_order():
    rows = [Row("1", "x", "long x"), Row("2", "y", None), Row("3", "x", "y"), Row("4", "z", "long x")]
    assert caption_texts(rows) == ["x", "long x", "y", "z"]


def test_epoch_batches_deterministic_and_ddp_exact():
    batches = epoch_batches(103, 4, seed=3, epoch=1, rank=0, world_size=3)
    assert batches == epoch_batches(103, 4, seed=3, epoch=1, rank=0, world_size=3)
    assert batches != epoch_batches(103, 4, seed=3, epoch=2, rank=0, world_size=3)
    assert batches != epoch_batches(103, 4, seed=4, epoch=1, rank=0, world_size=3)
    # one rank with the global batch: 103 // 12 = 8 steps, the 7 leftover rows dropped
    single = epoch_batches(103, 12, seed=3, epoch=1)
    assert len(single) == 8 and all(len(batch) == 12 for batch in single)
    assert len({index for batch in single for index in batch}) == 96
    per_rank = [epoch_batches(103, 4, seed=3, epoch=1, rank=rank, world_size=3) for rank in range(3)]
    assert all(len(batches) == 8 and all(len(batch) == 4 for batch in batches) for batches in per_rank)
    for step in range(8):  # ranks are disjoint and together are the 1-rank batch of the same step, in order
        assert per_rank[0][step] + per_rank[1][step] + per_rank[2][step] == single[step]
    # the brief's case: 2 ranks with batch B == 1 rank with batch 2B, step by step
    two = [epoch_batches(50, 5, seed=0, epoch=0, rank=rank, world_size=2) for rank in range(2)]
    assert [a + b for a, b in zip(*two)] == epoch_batches(50, 10, seed=0, epoch=0)
    with pytest.raises(DataError) as error:
        epoch_batches(10, 4, seed=0, epoch=0, rank=1, world_size=3)
    assert str(error.value) == "10 rows do not fill one global batch of 4 x 3 ranks: lower batch_size (--batch-size)"
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        epoch_batches(10, 2, seed=0, epoch=0, rank=2, world_size=2)


def test_resume_skips_done_batches(tmp_path):
    rows = [Row(str(tmp_path / f"{i}.png"), f"caption {i}") for i in range(40)]
    batches = epoch_batches(len(rows), 3, seed=7, epoch=0)
    dataset = ImageTextDataset(rows)
    full = [batch["indices"] for batch in make_loader(dataset, batches, workers=0)]
    assert full == batches and len(full) == 13
    resumed = [batch["indices"] for batch in make_loader(dataset, batches, workers=0, start_batch=5)]
    assert resumed == full[5:]


def test_workers_give_the_same_batches(bad_image_rows):
    rows, _ = bad_image_rows
    dataset = ImageTextDataset(rows, TRANSFORM)
    batches = epoch_batches(len(rows), 3, seed=1, epoch=0)
    # workers=0 first: the main process opens the shards, and the forked workers must not reuse those files
    in_process = list(make_loader(dataset, batches, workers=0))
    with_workers = list(make_loader(dataset, batches, workers=2))
    assert len(in_process) == len(with_workers) == 3
    bad_rows = {1, 2, 3, 4, 5}  # corrupt, empty, missing, truncated, the corrupt tar member
    covered = {index for batch in batches for index in batch}
    assert [image for batch in in_process for image in batch["bad_images"]] == \
        [rows[index].image for batch in batches for index in batch if index in bad_rows]
    assert sum(len(batch["indices"]) for batch in in_process) == len(covered - bad_rows)
    for a, b in zip(in_process, with_workers):
        assert a["indices"] == b["indices"] and a["captions"] == b["captions"]
        assert a["bad_images"] == b["bad_images"] and a["long_captions"] == b["long_captions"]
        assert (a["pixels"] is None and b["pixels"] is None) or torch.equal(a["pixels"], b["pixels"])


def test_tar_index_sidecar_is_reused_and_rebuilt_when_the_shard_changes(tmp_path, shards, monkeypatch):
    pattern, _ = shards
    shard = tmp_path / "shard-000.tar"
    write_tar(tmp_path / "bad.tar", {"0.png": image_bytes(RED), "1.png": image_bytes(RED), "1.txt": b"ok"})
    source = f"{pattern}::{tmp_path / 'bad.tar'}"
    first_log, second_log = [], []
    first = list(read_rows(source, log=first_log.append))
    assert sorted(p.name for p in tmp_path.glob("*.index.npz")) == ["bad.tar.index.npz", "shard-000.tar.index.npz",
                                                                    "shard-001.tar.index.npz"]
    scans = []
    monkeypatch.setattr(data, "_scan_tar", lambda path: scans.append(path) or (_ for _ in ()).throw(AssertionError))
    assert list(read_rows(source, log=second_log.append)) == first and scans == []  # no shard rescanned
    assert second_log == first_log == [f"warning: skipping {tmp_path / 'bad.tar'}:0: no caption member "
                                       f"(0.txt or 0.json)", f"warning: skipped 1 malformed rows in {source}"]
    with pytest.raises(DataError, match="bad.tar:0: no caption member"):  # strict sees the recorded problem
        read_rows(source, strict=True)
    monkeypatch.undo()
    write_tar(shard, {"000009.png": image_bytes(GREEN), "000009.txt": b"rewritten shard"})  # new size and mtime
    rows = list(read_rows(pattern))
    assert [row.caption for row in rows] == ["rewritten shard", "vert \u00e9meraude", "blue"]
    tar_path, offset, size = rows[0].tar_member
    with open(tar_path, "rb") as f:
        f.seek(offset)
        assert f.read(size) == image_bytes(GREEN)
    (tmp_path / "shard-001.tar.index.npz").write_bytes(b"torn")  # an unreadable sidecar is rebuilt, not trusted
    assert [row.caption for row in read_rows(pattern)] == [row.caption for row in rows]
    sidecar = (tmp_path / "shard-001.tar.index.npz").read_bytes()
    for torn in (b"", sidecar[:len(sidecar) // 2]):  # np.load raises EOFError and zipfile.BadZipFile for these
        (tmp_path / "shard-001.tar.index.npz").write_bytes(torn)
        assert [row.caption for row in read_rows(pattern)] == [row.caption for row in rows]


def test_compact_rows_cost_their_text_bytes_plus_24_and_concatenate(tmp_path, shards):
    lines = [json.dumps({"image": f"images/{i:08d}.jpg", "caption": f"caption number {i} " * 3,
                         **({"long_caption": "a long one " * 20} if i % 3 == 0 else {})}) for i in range(2000)]
    rows = read_rows(write_lines(tmp_path / "rows.jsonl", lines))
    text_bytes = sum(len(s.encode()) for row in rows for s in (row.image, row.caption, row.long_caption or ""))
    stored = rows.text.nbytes + rows.ends.nbytes + rows.shard_ids.nbytes + rows.members.nbytes
    assert stored == text_bytes + 24 * len(rows) and stored < 1.5 * text_bytes
    pattern, _ = shards
    tar_rows = read_rows(pattern)
    joined = rows + tar_rows + [Row("/x.png", "x")]  # Rows + Rows + list, as train.py adds val rows
    assert len(joined) == 2005 and list(joined) == list(rows) + list(tar_rows) + [Row("/x.png", "x")]
    assert joined[-1] == Row("/x.png", "x") and joined[2000] == tar_rows[0] and joined[2000].tar_member is not None
    assert caption_texts(joined)[:2] == [rows[0].caption, rows[0].long_caption]
    with pytest.raises(IndexError):
        joined[2005]
