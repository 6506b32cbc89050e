"""eval.py end to end on tiny random models: its JSON metrics equal those computed from reference features.

- `--clip`: the reference is transformers' own pipeline (CLIPImageProcessorPil, a fast tokenizer read from the
  same tokenizer.json, CLIPModel.get_image_features / get_text_features) fed to miniproclip.metrics's metric
  functions, whose definitions are tested against CLIP_benchmark in test_metrics.py. Tolerance 1e-6 on metrics
  (they are fractions of hits; features agree to ~1e-6, far from flipping a ranking on these seeds).
- `--model`: the reference is ProCLIP.encode_image / encode_text on LLMEmbedder embeddings computed here.
- Unreadable images are skipped and listed, user errors exit with status 1 and one line, --show draws its grid.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")

from miniproclip import evaluation
from miniproclip.checkpoint import save_checkpoint
from miniproclip.clip import CLIP
from miniproclip.embedder import EmbedSettings, LLMEmbedder
from miniproclip.metrics import classification_metrics, retrieval_metrics, zeroshot_classifier
from miniproclip.head import HeadConfig
from miniproclip.image import ImageTransform, load_image
from miniproclip.model import ProCLIP
from miniproclip.precision import autocast, default_precision

from fixtures import REPO, WORDS, write_image, write_tiny_clip, write_tiny_llm  # noqa: E402

from miniproclip import eval_cli  # eval.py's flags and flow

TOL = 1e-6
LONG_CAPTION = " ".join(["a red cat on the grass"] * 20)  # 120 words: past CLIP's 77 tokens
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}.", "{c}"]
CLASSNAMES = ["cat", "dog", "red fox", "blue bird", "table", "tree"]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """A tiny CLIP (new and old eos config, same weights), a Karpathy JSON with one corrupt and one missing
    image, a caption JSONL, and a zero-shot folder of 6 classes x 2 images."""
    root = tmp_path_factory.mktemp("eval")
    clip_dir, legacy_dir = str(root / "clip"), str(root / "clip_legacy")
    write_tiny_clip(clip_dir)
    write_tiny_clip(legacy_dir, eos_token_id=2)  # the same weights with a pre-2023 config
    reference = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    entries = []
    for i in range(14):
        name = f"im{i}.png"
        if i == 3:
            (root / "images" / "val").mkdir(parents=True, exist_ok=True)
            (root / "images" / "val" / name).write_bytes(b"not an image")
        elif i != 7:  # image 7 is missing
            write_image(str(root / "images" / "val" / name), seed=i)
        captions = [f"a photo of {WORDS[i]} number {i}", f"{WORDS[i + 1]} and {WORDS[i]}"]
        captions += [LONG_CAPTION] if i == 5 else []
        entries.append({"filename": name, "filepath": "val", "split": "train" if i == 13 else "test",
                        "sentences": [{"raw": c} for c in captions]})
    (root / "karpathy.json").write_text(json.dumps({"images": entries}))
    rows = [{"image": f"images/val/im{i}.png", "captions": [f"the {WORDS[i]} {WORDS[i + 2]}"]}
            for i in (0, 1, 2, 4, 5, 6, 8)]
    (root / "long.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for c in range(len(CLASSNAMES)):
        for j in range(2):
            write_image(str(root / "zeroshot" / f"n{c:03d}" / f"{j}.jpg"), seed=100 + 10 * c + j)
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "templates.json").write_text(json.dumps(TEMPLATES))
    return {"root": root, "clip": clip_dir, "legacy": legacy_dir, "reference": reference}


def run_eval(*argv):
    return eval_cli.main([*map(str, argv), "--workers", "0", "--batch-size", "4"])


def hf_image_features(eval_data, paths):
    """Normalised features from transformers' own image processor and CLIPModel."""
    processor = transformers.CLIPImageProcessorPil.from_pretrained(eval_data["clip"])
    pixels = torch.from_numpy(processor([Image.open(p) for p in paths], return_tensors="np")["pixel_values"])
    with torch.no_grad():
        return F.normalize(eval_data["reference"].get_image_features(pixel_values=pixels).pooler_output, dim=-1)


def hf_text_features(eval_data, texts):
    """(normalised features, number of captions past 77 tokens) from a transformers tokenizer and CLIPModel."""
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(eval_data["clip"], "tokenizer.json"),
                                                     pad_token="<|endoftext|>")
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        features = F.normalize(eval_data["reference"].get_text_features(input_ids=ids).pooler_output, dim=-1)
    return features, sum(len(row) > 77 for row in tokenizer(texts)["input_ids"])


def assert_metrics_equal(ours, reference):
    assert ours.keys() == reference.keys()
    for name in reference:
        assert ours[name] == pytest.approx(reference[name], abs=TOL), name
    assert any(0 < v < 1 for v in reference.values())  # not a degenerate all-or-nothing gallery


def test_retrieval_karpathy_matches_transformers_and_skips_unreadable(eval_data, tmp_path):
    root = eval_data["root"]
    out = tmp_path / "out.json"
    run_eval("--task", "retrieval", "--clip", eval_data["clip"], "--dataset", root / "karpathy.json",
             "--images", root / "images", "--output", out)
    report = json.loads(out.read_text())
    # the reference: the 11 readable test images and their captions, features from transformers
    kept = [i for i in range(13) if i not in (3, 7)]
    images = [str(root / "images" / "val" / f"im{i}.png") for i in kept]
    entries = json.loads((root / "karpathy.json").read_text())["images"]
    texts = [s["raw"] for i in kept for s in entries[i]["sentences"]]
    text_to_image = torch.tensor([n for n, i in enumerate(kept) for _ in entries[i]["sentences"]])
    text_features, truncated = hf_text_features(eval_data, texts)
    assert_metrics_equal(report["metrics"], retrieval_metrics(hf_image_features(eval_data, images), text_features,
                                                              text_to_image))
    assert truncated == 1
    assert {k: report[k] for k in ("task", "n_images", "n_texts", "split", "truncated_captions")} == {
        "task": "retrieval", "n_images": 11, "n_texts": 23, "split": "test", "truncated_captions": 1}
    assert sorted(os.path.basename(p) for p in report["skipped_images"]) == ["im3.png", "im7.png"]
    assert report["model"] == eval_data["clip"] and report["dataset"] == str(root / "karpathy.json")


def test_legacy_eos_config_gives_the_same_metrics(eval_data, tmp_path):
    root = eval_data["root"]
    reports = [run_eval("--task", "retrieval", "--clip", clip, "--dataset", root / "long.jsonl", "--ks", "1,3")
               for clip in (eval_data["clip"], eval_data["legacy"])]
    assert reports[0]["metrics"] == reports[1]["metrics"]
    images = [str(root / "images" / "val" / f"im{i}.png") for i in (0, 1, 2, 4, 5, 6, 8)]
    texts = [json.loads(line)["captions"][0] for line in (root / "long.jsonl").read_text().splitlines()]
    assert_metrics_equal(reports[0]["metrics"], retrieval_metrics(hf_image_features(eval_data, images),
                                                                  hf_text_features(eval_data, texts)[0],
                                                                  torch.arange(7), ks=(1, 3)))


def test_zeroshot_matches_transformers_from_the_command_line(eval_data, tmp_path):
    root = eval_data["root"]
    out = tmp_path / "zs.json"
    (tmp_path / "heldout.txt").write_text(f"{CLASSNAMES[1]}\n{CLASSNAMES[4]}\n")
    result = subprocess.run([sys.executable, str(REPO / "eval.py"), "--task", "zeroshot", "--clip", eval_data["clip"],
                             "--dataset", str(root / "zeroshot"), "--classnames", str(root / "classnames.txt"),
                             "--templates", str(root / "templates.json"), "--output", str(out), "--workers", "1",
                             "--heldout-classes", str(tmp_path / "heldout.txt")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    images = [str(root / "zeroshot" / f"n{c:03d}" / f"{j}.jpg") for c in range(6) for j in range(2)]
    labels = torch.tensor([c for c in range(6) for _ in range(2)])
    image_features = hf_image_features(eval_data, images)
    classifier = zeroshot_classifier(lambda texts: hf_text_features(eval_data, texts)[0], CLASSNAMES, TEMPLATES)
    logits = 100 * image_features @ classifier
    heldout = (labels == 1) | (labels == 4)
    expected = {**classification_metrics(logits, labels),
                "acc1_seen": classification_metrics(logits[~heldout], labels[~heldout])["acc1"],
                "acc1_heldout": (logits[heldout].argmax(1) == labels[heldout]).float().mean().item()}
    assert_metrics_equal(report["metrics"], expected)
    assert (report["n_images"], report["n_texts"], report["n_classes"]) == (12, 18, 6)
    assert "acc1" in result.stdout and f"results written to {out}" in result.stdout


def test_show_draws_queries_with_the_right_image_framed(eval_data, tmp_path):
    root = eval_data["root"]
    report = run_eval("--task", "retrieval", "--clip", eval_data["clip"], "--dataset", root / "long.jsonl",
                      "--ks", "1", "--show", "3", "--output", tmp_path / "r.json")
    grid = Image.open(tmp_path / "r.png")
    cell = evaluation.THUMB + evaluation.PAD
    assert grid.size == (evaluation.CAPTION_WIDTH + 5 * cell + evaluation.PAD, 3 * cell + evaluation.PAD)
    # query 0 (image 0's caption): the right image's frame is green, the other frames grey, in score order
    images = [str(root / "images" / "val" / f"im{i}.png") for i in (0, 1, 2, 4, 5, 6, 8)]
    texts = [json.loads(line)["captions"][0] for line in (root / "long.jsonl").read_text().splitlines()]
    scores = hf_text_features(eval_data, texts[:1])[0] @ hf_image_features(eval_data, images).T  # (1, I)
    top5 = scores[0].topk(5).indices.tolist()
    for column, image_index in enumerate(top5):
        corner = grid.getpixel((evaluation.CAPTION_WIDTH + column * (evaluation.THUMB + evaluation.PAD) + 1, evaluation.PAD + 1))
        assert corner == ((0, 128, 0) if image_index == 0 else (204, 204, 204))
    assert report["n_images"] == 7


def write_checkpoint(run_dir, eval_data, llm_dir, stage, seed):
    """A train.py-style checkpoint of a tiny ProCLIP with random head (and, stage 2, perturbed image tower)."""
    torch.manual_seed(seed)
    head = HeadConfig(32, 16, num_blocks=1, mlp_ratio=2)
    model = ProCLIP.from_clip(CLIP.from_pretrained(eval_data["clip"]), head)
    with torch.no_grad():
        model.visual_projection.weight.add_(0.5 * torch.randn_like(model.visual_projection.weight))
    weights = ({f"text_head.{k}": v for k, v in model.text_head.state_dict().items()} if stage == 1
               else model.state_dict())
    args = {"clip": eval_data["clip"], "llm": llm_dir, "max_length": 8, "instruction": "", "bidirectional": False,
            "text_cache": str(Path(run_dir).parent / "text_cache.safetensors"), "llm_dtype": "fp32", "batch_tokens": 64}
    save_checkpoint(str(run_dir), 7, weights, {}, {"stage": stage, "step": 7, "args": args, "head": head.__dict__})
    if stage == 1:  # what is evaluated: the original image tower with the trained head
        model = ProCLIP.from_clip(CLIP.from_pretrained(eval_data["clip"]), head)
        model.text_head.load_state_dict({k.removeprefix("text_head."): v for k, v in weights.items()})
    return model.eval()


def test_model_checkpoints_on_the_toy_world_defaults(eval_data, tmp_path, monkeypatch):
    """No --model: the newest run under runs/ is evaluated on toyworld/...; features by hand from ProCLIP."""
    llm_dir = str(tmp_path / "llm")
    write_tiny_llm(llm_dir)
    # the stage-2 run's checkpoint is the newest although its folder is older and its name sorts first
    newer = write_checkpoint(tmp_path / "runs" / "a_stage2", eval_data, llm_dir, stage=2, seed=2)
    older = write_checkpoint(tmp_path / "runs" / "z_stage1", eval_data, llm_dir, stage=1, seed=1)
    os.utime(tmp_path / "runs" / "z_stage1" / "latest", (1, 1))
    toy = tmp_path / "toyworld"
    toy.mkdir()
    images = [str(eval_data["root"] / "images" / "val" / f"im{i}.png") for i in (0, 1, 2, 4, 5, 6, 8)]
    texts = [f"a photo of the {WORDS[i]} on the grass with {WORDS[i + 1]}" for i in range(7)]  # 12 tokens > 8
    texts[2] = "two dogs"
    (toy / "retrieval_long.jsonl").write_text("".join(json.dumps({"image": p, "captions": [t]}) + "\n"
                                                      for p, t in zip(images, texts)))
    classes = ["cat", "dog", "grass", "table", "tree"]  # in sorted folder order; "tree" is an unknown word
    for c, name in enumerate(classes):
        write_image(str(toy / "zeroshot" / "test" / f"n{c}" / "0.png"), seed=200 + c)
    (toy / "zeroshot" / "classnames.txt").write_text("\n".join(classes) + "\n")
    (toy / "zeroshot" / "templates.json").write_text(json.dumps(["a photo of a {c}", "{c}"]))
    monkeypatch.chdir(tmp_path)

    report = run_eval("--task", "retrieval", "--dataset", "long", "--ks", "1,2,5")
    assert report["model"] == os.path.join("runs", "a_stage2", "step_000007.safetensors")
    assert os.path.isfile(os.path.join("runs", "a_stage2", "eval_retrieval_retrieval_long_step_000007.json"))
    embedder = LLMEmbedder(llm_dir, EmbedSettings(max_length=8))
    embeddings, truncated = embedder.embed(texts)
    transform = ImageTransform.from_folder(eval_data["clip"])
    in_eval_precision = autocast("cpu", default_precision("cpu"))  # eval.py's default (bf16 where the CPU has it)
    with torch.no_grad(), in_eval_precision:
        image_features = newer.encode_image(torch.stack([transform(load_image(p)) for p in images]))
        text_features = newer.encode_text(embeddings)
    reference = retrieval_metrics(image_features, text_features, torch.arange(7), (1, 2, 5))
    assert_metrics_equal(report["metrics"], reference)
    assert report["truncated_captions"] == truncated == 6

    report = run_eval("--task", "zeroshot", "--model", "runs/z_stage1")  # a stage-1 run: the original image tower
    zs_images = [str(toy / "zeroshot" / "test" / f"n{c}" / "0.png") for c in range(5)]
    with torch.no_grad(), in_eval_precision:
        image_features = older.encode_image(torch.stack([transform(load_image(p)) for p in zs_images]))
        classifier = zeroshot_classifier(lambda ts: older.encode_text(embedder.embed(ts)[0]), classes,
                                         ["a photo of a {c}", "{c}"])
    reference = classification_metrics(100 * image_features @ classifier, torch.arange(5))
    assert report["metrics"] == pytest.approx(reference, abs=TOL)
    assert report["n_images"] == 5 and report["truncated_captions"] == 0


def test_readers_language_split_and_class_order(tmp_path):
    rows = [{"image": "a.png", "captions": {"de": ["eine Katze", "ein Tier"], "fr": ["un chat"]}},
            {"image": "/abs/b.png", "captions": {"fr": ["un chien"]}}]
    (tmp_path / "multi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    de = evaluation.read_caption_jsonl(str(tmp_path / "multi.jsonl"), language="de")
    assert (de.images, de.texts, de.text_to_image) == ([str(tmp_path / "a.png")], ["eine Katze", "ein Tier"], [0, 0])
    fr = evaluation.read_caption_jsonl(str(tmp_path / "multi.jsonl"), images_dir="/img", language="fr")
    assert (fr.images, fr.texts, fr.text_to_image) == (["/img/a.png", "/abs/b.png"], ["un chat", "un chien"], [0, 1])
    with pytest.raises(evaluation.BenchmarkError, match=r"pass language \(--language\)"):
        evaluation.read_caption_jsonl(str(tmp_path / "multi.jsonl"))
    rows = [{"image": "a.png", "captions": ["a cat"], "language": "en"}, {"image": "b.png", "captions": ["ein Hund"],
                                                                          "language": "de"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert evaluation.read_caption_jsonl(str(tmp_path / "rows.jsonl"), language="de").texts == ["ein Hund"]
    assert evaluation.read_caption_jsonl(str(tmp_path / "rows.jsonl")).texts == ["a cat", "ein Hund"]
    (tmp_path / "k.json").write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "val", "sentences": []}]}))
    with pytest.raises(evaluation.BenchmarkError, match=r"no image with split 'test' \(it has: val\)"):
        evaluation.read_retrieval_set(str(tmp_path / "k.json"))
    for name in ["b_dog", "a_cat", "c_red_fox"]:  # classes are the sorted folder names, "_" read as a space
        (tmp_path / "zs" / name).mkdir(parents=True)
        (tmp_path / "zs" / name / "0.JPG").write_bytes(b"")
    (tmp_path / "zs" / "a_cat" / "notes.txt").write_text("not an image")
    folder = evaluation.read_image_folder(str(tmp_path / "zs"))
    assert folder.classnames == ["a cat", "b dog", "c red fox"] and folder.labels == [0, 1, 2]


@pytest.mark.parametrize("case", ["missing_dataset", "not_clip_folder", "no_readable_image", "no_runs", "k_too_large"])
def test_user_errors_exit_2_with_one_line(eval_data, tmp_path, monkeypatch, capsys, case):
    root = eval_data["root"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "bad/x.jpg", "captions": ["a cat"]}) + "\n")
    argv = {"missing_dataset": ["--clip", eval_data["clip"], "--dataset", tmp_path / "nope.json"],
            "not_clip_folder": ["--clip", root, "--dataset", root / "long.jsonl"],
            "no_readable_image": ["--clip", eval_data["clip"], "--dataset", tmp_path / "bad.jsonl"],
            "no_runs": [],
            "k_too_large": ["--clip", eval_data["clip"], "--dataset", root / "long.jsonl", "--ks", "1,8"]}[case]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_eval("--task", "retrieval", *argv)
    last = exit_info.value.code  # sys.exit("error: ..."): printed to stderr, exit status 1 (every entry point)
    assert isinstance(last, str) and last.startswith("error: ") and "\n" not in last
    assert "Traceback" not in capsys.readouterr().err
    expected = {"missing_dataset": "nope.json", "not_clip_folder": "config.json", "no_readable_image": "x.jpg",
                "no_runs": "runs", "k_too_large": "recall@8"}[case]
    assert expected in last
