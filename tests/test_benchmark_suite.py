"""The benchmark suite (miniproclip/benchmarks/suite.py) on stand-in readers over tiny image sets and a tiny CLIP.

- Parity: the suite's retrieval and zero-shot numbers equal an independent computation: transformers' CLIPModel
  (get_image_features / get_text_features on CLIPImageProcessorPil pixels and a fast tokenizer's 77 tokens of the
  same folder) scored with CLIP_benchmark's metric definitions written out here with Python loops (image->text hit
  if any of its captions ranks in the top k; text->image recall@k; acc1, acc5, mean per-class recall). 1e-6.
- benchmark.json / benchmark.md: column order, averages over the datasets present, missing datasets, case-insensitive
  folders, skipped images counted, the paper's rows; a present but broken folder fails naming it; the per-benchmark
  LLM text cache is reused (the second run embeds nothing); `eval.py --benchmark proclip` prints the tables.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")

from miniproclip import evaluation
from miniproclip.benchmarks import ClassificationSet, RetrievalSet, suite
from miniproclip.errors import BenchmarkError

from fixtures import WORDS, write_tiny_clip, write_tiny_llm
from miniproclip import eval_cli  # noqa: E402

TOL = 1e-6
KS = (1, 2, 5)
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}.", "{c}"]


def write_image(path, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8) // 2 + rng.integers(0, 128, 3, dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def read_pairs(folder, language=None):
    """Stand-in retrieval reader: pairs.json = [[image, [captions]]] (per language for xm3600)."""
    path = os.path.join(folder, f"pairs_{language}.json" if language else "pairs.json")
    if not os.path.isfile(path):
        raise BenchmarkError(f"{path} not found; expected pairs.json (stand-in layout)")
    dataset = RetrievalSet([], [], [])
    for image, captions in json.loads(Path(path).read_text()):
        dataset.images.append(os.path.join(folder, image))
        dataset.texts += captions
        dataset.text_to_image += [len(dataset.images) - 1] * len(captions)
    return dataset


def read_classes(folder):
    """Stand-in classification reader: one subfolder per class."""
    classes = sorted(os.listdir(folder))
    images = [(os.path.join(folder, c, f), label) for label, c in enumerate(classes)
              for f in sorted(os.listdir(os.path.join(folder, c)))]
    return ClassificationSet([p for p, _ in images], [label for _, label in images], classes)


REGISTRIES = ({"flickr30k": read_pairs, "urban1k": read_pairs, "dci": read_pairs, "xm3600": read_pairs},
              {"cifar10": read_classes, "imagenet1k": read_classes}, lambda name: TEMPLATES, ["de", "en"])


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory):
    """ROOT/Flickr30K (8 images x 2 captions, one missing), ROOT/URBAN-1k (6 x 1), ROOT/xm3600 (de: 5 images, en: 6),
    ROOT/cifar10 and ROOT/ImageNet1K (6 classes x 2 images); no dci/ folder."""
    tmp = tmp_path_factory.mktemp("suite")
    clip_dir, root = write_tiny_clip(str(tmp / "clip")), tmp / "data"
    pairs = [[f"im{i}.png", [f"a photo of {WORDS[i]} number {i}", f"{WORDS[i + 1]} and {WORDS[i]}"]] for i in range(8)]
    for i in range(8):
        if i != 5:  # im5.png is missing: skipped and counted
            write_image(str(root / "Flickr30K" / f"im{i}.png"), seed=i)
    (root / "Flickr30K" / "pairs.json").write_text(json.dumps(pairs))
    for i in range(6):
        write_image(str(root / "URBAN-1k" / f"u{i}.png"), seed=20 + i)
        write_image(str(root / "xm3600" / f"x{i}.png"), seed=40 + i)
    urban = [[f"u{i}.png", [f"the {WORDS[i + 2]}"]] for i in range(6)]
    (root / "URBAN-1k" / "pairs.json").write_text(json.dumps(urban))
    for language in ("de", "en"):
        rows = [[f"x{i}.png", [f"{language} {WORDS[i + 3]}"]] for i in range(5 if language == "de" else 6)]
        (root / "xm3600" / f"pairs_{language}.json").write_text(json.dumps(rows))
    for folder, seed in (("cifar10", 100), ("ImageNet1K", 200)):
        for c, name in enumerate(["cat", "dog", "red fox", "blue bird", "table", "tree"]):
            for j in range(2):
                write_image(str(root / folder / name / f"{j}.png"), seed=seed + 10 * c + j)
    return {"clip": clip_dir, "root": root, "reference": transformers.CLIPModel.from_pretrained(clip_dir).eval()}


def run(suite_root, encoders, **kwargs):
    return suite.run_suite(encoders, str(suite_root["root"]), registries=REGISTRIES, batch_size=4, workers=0, ks=KS,
                           log=lambda *a: None, **kwargs)


@pytest.fixture(scope="module")
def results(suite_root):
    return run(suite_root, evaluation.clip_encoders(suite_root["clip"], "cpu", "fp32"))


def hf_features(suite_root, images, texts):
    processor = transformers.CLIPImageProcessorPil.from_pretrained(suite_root["clip"])
    pixels = torch.from_numpy(processor([Image.open(p) for p in images], return_tensors="np")["pixel_values"])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(suite_root["clip"], "tokenizer.json"),
                                                     pad_token="<|endoftext|>")
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        image_features = suite_root["reference"].get_image_features(pixel_values=pixels).pooler_output
        text_features = suite_root["reference"].get_text_features(input_ids=ids).pooler_output
    return F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)


def reference_recall(image_features, text_features, text_to_image, k):
    """CLIP_benchmark's recall@k, one query at a time: (text->image, image->text)."""
    scores = (text_features @ image_features.T).tolist()  # (T, I)
    t2i = [text_to_image[t] in sorted(range(len(row)), key=lambda i: -row[i])[:k] for t, row in enumerate(scores)]
    i2t = []
    for i in range(len(image_features)):
        column = [row[i] for row in scores]
        top = sorted(range(len(column)), key=lambda t: -column[t])[:k]
        i2t.append(any(text_to_image[t] == i for t in top))
    return sum(t2i) / len(t2i), sum(i2t) / len(i2t)


def test_retrieval_matches_transformers_and_clip_benchmark_definitions(suite_root, results):
    root = suite_root["root"] / "Flickr30K"
    kept = [i for i in range(8) if i != 5]
    pairs = json.loads((root / "pairs.json").read_text())
    texts = [c for i in kept for c in pairs[i][1]]
    text_to_image = [n for n, i in enumerate(kept) for _ in pairs[i][1]]
    image_features, text_features = hf_features(suite_root, [str(root / f"im{i}.png") for i in kept], texts)
    report = results["retrieval"]["flickr30k"]
    for k in KS:
        t2i, i2t = reference_recall(image_features, text_features, text_to_image, k)
        assert report["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(t2i, abs=TOL)
        assert report["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(i2t, abs=TOL)
    assert 0 < report["metrics"]["text_retrieval_recall@1"] < 1
    assert (report["n_images"], report["n_texts"]) == (7, 14)


def test_zeroshot_matches_transformers_and_open_clip_classifier(suite_root, results):
    root = suite_root["root"] / "cifar10"
    classes = sorted(os.listdir(root))
    images = [str(root / c / f"{j}.png") for c in classes for j in range(2)]
    labels = [c for c in range(6) for _ in range(2)]
    prompts = [t.format(c=c) for c in classes for t in TEMPLATES]
    image_features, prompt_features = hf_features(suite_root, images, prompts)
    # open_clip's zero_shot.py: normalise each template's embedding, average, normalise again
    classifier = F.normalize(F.normalize(prompt_features, dim=-1).view(6, len(TEMPLATES), -1).mean(1), dim=-1)
    logits = (image_features @ classifier.T).tolist()  # (N, C)
    ranked = [sorted(range(6), key=lambda c: -row[c]) for row in logits]
    acc1 = sum(r[0] == y for r, y in zip(ranked, labels)) / 12
    acc5 = sum(y in r[:5] for r, y in zip(ranked, labels)) / 12
    per_class = [sum(ranked[n][0] == c for n in range(12) if labels[n] == c) / 2 for c in range(6)]
    metrics = results["classification"]["cifar10"]["metrics"]
    assert metrics["acc1"] == pytest.approx(acc1, abs=TOL) and 0 < acc1 < 1
    assert metrics["acc5"] == pytest.approx(acc5, abs=TOL)
    assert metrics["mean_per_class_recall"] == pytest.approx(sum(per_class) / 6, abs=TOL)


def test_tables_order_averages_missing_and_skipped(suite_root, results, tmp_path):
    markdown = suite.write_tables(results, str(tmp_path), "B/16-3M")
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert (tmp_path / "benchmark.md").read_text().strip() == markdown.strip()
    table1, table2, xm = (saved["summary"][k] for k in ("table1", "table2", "xm3600"))
    assert list(table1) == ["flickr30k", "urban1k", "average"]  # the paper's order, present only
    assert list(table2) == ["cifar10", "imagenet1k", "average"]
    assert list(xm) == ["de", "en", "mean"]
    r1 = lambda name: [100 * results["retrieval"][name]["metrics"][f"{d}_retrieval_recall@1"]  # noqa: E731
                       for d in ("text", "image")]
    assert table1["flickr30k"] == pytest.approx(r1("flickr30k"))
    assert table1["average"] == pytest.approx([(a + b) / 2 for a, b in zip(r1("flickr30k"), r1("urban1k"))])
    acc = [100 * results["classification"][n]["metrics"]["acc1"] for n in ("cifar10", "imagenet1k")]
    assert table2["average"] == pytest.approx(sum(acc) / 2)
    assert xm["mean"] == pytest.approx([(a + b) / 2 for a, b in zip(r1("xm3600/de"), r1("xm3600/en"))])
    assert "dci" in saved["missing"] and "coco" in saved["missing"] and "flickr30k" not in saved["missing"]
    assert "coco" in saved["no_reader"] and "dci" not in saved["no_reader"]
    assert saved["skipped_images"] == {"flickr30k": 1}
    assert saved["retrieval"]["flickr30k"]["skipped_images"][0].endswith("im5.png")
    # column order in the markdown, the paper's printed rows beside ours
    header = next(line for line in markdown.splitlines() if line.startswith("| model | Flickr30k"))
    assert header.split(" | ")[1:] == ["Flickr30k", "COCO", "ShareGPT4V-1k", "Urban-1k", "DOCCI", "DCI", "average |"]
    assert "| paper: ProCLIP | 89.4/77.6 | 61.7/46.8 |" in markdown and "| 79.4/76.7 |" in markdown
    assert "| paper: LLM2CLIP | 56.9 | 92.6 |" in markdown
    assert "over the datasets present here (Flickr30k, Urban-1k)" in markdown


def test_xm3600_languages_share_one_encoding_of_the_images(suite_root, monkeypatch):
    encoders, encode_images, calls = evaluation.clip_encoders(suite_root["clip"], "cpu", "fp32"), evaluation.encode_images, []
    monkeypatch.setattr(evaluation, "encode_images", lambda e, paths, *a: calls.append(len(paths)) or
                        encode_images(e, paths, *a))
    shared = run(suite_root, encoders, names=["xm3600"])
    assert calls == [6]  # the union of both languages' images, once
    for language, count in (("de", 5), ("en", 6)):
        direct, _ = evaluation.run_retrieval(encoders, read_pairs(str(suite_root["root"] / "xm3600"), language), 4, 0,
                                             "cpu", KS)
        report = shared["retrieval"][f"xm3600/{language}"]
        assert report["metrics"] == pytest.approx(direct["metrics"], abs=TOL) and report["n_images"] == count


def test_present_but_broken_folder_fails_naming_it(suite_root, tmp_path):
    (tmp_path / "Urban1k").mkdir()
    with pytest.raises(BenchmarkError, match=r"^urban1k \(.*Urban1k\) is present but cannot be read: .*pairs.json"):
        suite.run_suite(None, str(tmp_path), registries=REGISTRIES)
    with pytest.raises(BenchmarkError, match="no folder flickr30k/"):
        suite.run_suite(None, str(tmp_path), names=["flickr30k"], registries=REGISTRIES)
    with pytest.raises(BenchmarkError, match=r"paper_rows \(--paper-rows\) 'B/32'"):
        suite.load_paper_rows("B/32")


def write_proclip_checkpoint(run_dir, clip_dir, llm_dir):
    """A train.py-style stage-1 checkpoint: the tiny CLIP with a random head over the tiny LLM."""
    from miniproclip.checkpoint import save_checkpoint
    from miniproclip.clip import CLIP
    from miniproclip.head import HeadConfig
    from miniproclip.model import ProCLIP
    head = HeadConfig(32, 16, num_blocks=1, mlp_ratio=2)
    model = ProCLIP.from_clip(CLIP.from_pretrained(clip_dir), head)
    args = {"clip": clip_dir, "llm": llm_dir, "max_length": 8, "instruction": "", "bidirectional": False,
            "text_cache": str(Path(run_dir).parent / "train_cache.safetensors"), "llm_dtype": "fp32",
            "batch_tokens": 64}
    weights = {f"text_head.{k}": v for k, v in model.text_head.state_dict().items()}
    save_checkpoint(str(run_dir), 7, weights, {}, {"stage": 1, "step": 7, "args": args, "head": head.__dict__})


def test_text_cache_per_benchmark_is_reused(suite_root, tmp_path):
    llm_dir = write_tiny_llm(str(tmp_path / "llm"))
    write_proclip_checkpoint(tmp_path / "run", suite_root["clip"], llm_dir)
    logs = []
    names = ["urban1k", "cifar10"]
    first = run(suite_root, evaluation.proclip_encoders(str(tmp_path / "run"), None, "cpu", "fp32", log=logs.append),
                names=names, cache_dir=str(tmp_path / "cache"))
    assert sum("encoding" in line for line in logs) == 2  # one cache per benchmark
    caches = sorted(os.listdir(tmp_path / "cache"))
    assert len(caches) == 2 and caches[0].startswith("text_cache_cifar10_llm_")
    logs.clear()
    second = run(suite_root, evaluation.proclip_encoders(str(tmp_path / "run"), None, "cpu", "fp32", log=logs.append),
                 names=names, cache_dir=str(tmp_path / "cache"))
    assert not any("encoding" in line for line in logs)  # the second run embeds nothing
    assert second["retrieval"]["urban1k"]["metrics"] == first["retrieval"]["urban1k"]["metrics"]
    assert second["classification"]["cifar10"]["metrics"] == first["classification"]["cifar10"]["metrics"]


def test_eval_cli_prints_the_tables(suite_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite, "default_registries", lambda: REGISTRIES)
    results = eval_cli.main(["--benchmark", "proclip", "--data-root", str(suite_root["root"]), "--clip", suite_root["clip"],
                             "--ks", "1,2", "--workers", "0", "--output", str(tmp_path), "--language", "de",
                             "--paper-rows", "L/14-30M"])
    out = capsys.readouterr().out
    assert "## Table 1: zero-shot retrieval R@1, I2T / T2I" in out and "| paper: ProCLIP | 94.5/81.6" in out
    assert list(results["summary"]["xm3600"]) == ["de", "mean"]  # --language: that one language
    assert (tmp_path / "benchmark.md").is_file()
    eval_cli.main(["--dataset", "URBAN1K", "--data-root", str(suite_root["root"]), "--clip", suite_root["clip"], "--ks", "1",
                   "--workers", "0", "--output", str(tmp_path / "one")])
    saved = json.loads((tmp_path / "one" / "benchmark.json").read_text())
    assert list(saved["retrieval"]) == ["urban1k"] and saved["missing"] == []


def test_released_layouts_through_eval_py_equal_transformers(tmp_path, suite_root, capsys):
    """The real readers on tiny replicas of two released layouts (Urban-1k: image/{i}.jpg + caption/{i}.txt, first
    line; XM3600: captions.jsonl + images/{key}.jpg, caption 0) under one ROOT, through `eval.py --benchmark`:
    its R@k equal transformers' features scored with CLIP_benchmark's definitions; the other datasets are listed."""
    root = tmp_path / "bench"
    for i in range(1, 7):
        write_image(str(root / "Urban1k" / "image" / f"{i}.jpg"), seed=300 + i)
        (root / "Urban1k" / "caption").mkdir(parents=True, exist_ok=True)
        (root / "Urban1k" / "caption" / f"{i}.txt").write_text(f"a photo of {WORDS[i]} and {WORDS[i + 4]}\nnot read\n")
    keys = [f"{i:016x}" for i in range(5)]
    (root / "xm3600").mkdir()
    with open(root / "xm3600" / "captions.jsonl", "w") as f:
        for i, key in enumerate(keys):
            write_image(str(root / "xm3600" / "images" / f"{key}.jpg"), seed=400 + i)
            captions = {"caption": [f"{WORDS[i + 2]} {WORDS[i]}", "second caption, not read"]}
            f.write(json.dumps({"image/key": key, "en": captions, "de": captions}) + "\n")
    results = eval_cli.main(["--benchmark", "proclip", "--data-root", str(root), "--clip", suite_root["clip"], "--ks",
                             "1,2,5", "--workers", "0", "--output", str(tmp_path / "out"), "--language", "en",
                             "--precision", "fp32"])
    assert "## Table 1" in capsys.readouterr().out and (tmp_path / "out" / "benchmark.md").is_file()
    assert "flickr30k" in results["missing"] and "imagenet1k" in results["missing"]
    urban = [str(root / "Urban1k" / "image" / f"{i}.jpg") for i in range(1, 7)]
    urban_texts = [f"a photo of {WORDS[i]} and {WORDS[i + 4]}\n" for i in range(1, 7)]
    xm = [str(root / "xm3600" / "images" / f"{key}.jpg") for key in keys]
    xm_texts = [f"{WORDS[i + 2]} {WORDS[i]}" for i in range(5)]
    for metrics, images, texts in ((results["retrieval"]["urban1k"]["metrics"], urban, urban_texts),
                                   (results["retrieval"]["xm3600/en"]["metrics"], xm, xm_texts)):
        image_features, text_features = hf_features(suite_root, images, texts)
        for k in KS:
            t2i, i2t = reference_recall(image_features, text_features, list(range(len(images))), k)
            assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i, abs=TOL)
            assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t, abs=TOL)
