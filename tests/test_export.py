"""`python -m miniproclip.export RUN OUT`: OUT loads in transformers' CLIPModel and in miniproclip.load_model.

The reference for the image side is transformers itself (CLIPModel.from_pretrained(OUT) with its own PIL image
processor read from OUT); features agree with load_model's to 1e-5 (float32, two implementations). The text side
of an export must give load_model(RUN)'s features exactly (the same head and LLM).
"""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")

import eval as eval_cli
import train
from miniproclip.api import load_model
from miniproclip.training.curves import PANEL_HEIGHT, curve_panels, read_metrics, write_curves
from miniproclip.export import export, main

from fixtures import build_world, write_run, write_tiny_pairs


@pytest.fixture(scope="module")
def export_runs(tmp_path_factory):
    export_runs = build_world(tmp_path_factory.mktemp("export"))
    for stage, seed in ((2, 2), (1, 1)):
        write_run(export_runs["root"] / "runs" / f"stage{stage}", export_runs["clip"], export_runs["llm"], stage, seed, "fp32")
    return export_runs


def hf_image_features(folder, paths):
    """L2-normalised image features of an HF CLIP folder, with transformers' own preprocessing."""
    model, info = transformers.CLIPModel.from_pretrained(folder, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info  # key for key
    processor = transformers.CLIPImageProcessorPil.from_pretrained(folder)
    pixels = torch.from_numpy(processor([Image.open(p) for p in paths], return_tensors="np")["pixel_values"])
    with torch.no_grad():
        return F.normalize(model.eval().get_image_features(pixel_values=pixels).pooler_output, dim=-1), model


def test_stage2_export_loads_in_transformers_and_load_model(export_runs, tmp_path):
    run, out = export_runs["root"] / "runs" / "stage2", tmp_path / "exported"
    main([str(run), str(out)])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json",
                                       "proclip.json", "text_head.safetensors", "tokenizer.json"]
    hf_features, hf_model = hf_image_features(out, export_runs["images"])
    # fp32: transformers' reference runs in fp32 (load_model's CPU default is bf16 where the CPU has it)
    exported, trained = (load_model(folder, device="cpu", dtype=torch.float32) for folder in (out, run))
    torch.testing.assert_close(exported.encode_image(export_runs["images"]), hf_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(trained.encode_image(export_runs["images"]), hf_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(exported.encode_text(export_runs["texts"]), trained.encode_text(export_runs["texts"]),
                               atol=0, rtol=0)
    assert hf_model.logit_scale.item() == exported.logit_scale.item() == pytest.approx(3.0)
    # the text tower is the original CLIP's, key for key
    original = transformers.CLIPModel.from_pretrained(export_runs["clip"])
    for key, value in original.text_model.state_dict().items():
        assert torch.equal(hf_model.text_model.state_dict()[key], value), key
    assert torch.equal(hf_model.text_projection.weight, original.text_projection.weight)
    assert not torch.equal(hf_model.visual_projection.weight, original.visual_projection.weight)  # tuned
    config = json.loads((out / "proclip.json").read_text())
    assert config["llm"] == os.path.abspath(export_runs["llm"]) and config["llm_dtype"] == "fp32"
    assert config["source"]["stage"] == 2 and config["source"]["step"] == 7
    assert config["embedding"] == {"max_length": 8, "instruction": "", "append_eos": False, "causal": True, "suffix": "",
                                   "pool_bos": True, "pool": "mean", "instruction_format": "{}"}


def test_stage1_export_has_the_original_image_tower(export_runs, tmp_path):
    out = export(str(export_runs["root"] / "runs" / "stage1"), str(tmp_path / "s1"))
    hf_features, _ = hf_image_features(out, export_runs["images"])
    original, _ = hf_image_features(export_runs["clip"], export_runs["images"])
    torch.testing.assert_close(hf_features, original, atol=0, rtol=0)
    trained = load_model(export_runs["root"] / "runs" / "stage1", device="cpu")
    torch.testing.assert_close(load_model(out, device="cpu").encode_text(export_runs["texts"]),
                               trained.encode_text(export_runs["texts"]), atol=0, rtol=0)


def test_copy_llm_makes_a_folder_that_travels(export_runs, tmp_path):
    own_llm = shutil.copytree(export_runs["llm"], tmp_path / "llm")  # the run's LLM, which then goes away
    write_run(tmp_path / "run", export_runs["clip"], str(own_llm), 2, seed=2, llm_dtype="fp32")
    expected = load_model(tmp_path / "run", device="cpu").encode_text(export_runs["texts"])
    main([str(tmp_path / "run"), str(tmp_path / "out"), "--copy-llm"])
    assert json.loads((tmp_path / "out" / "proclip.json").read_text())["llm"] == "llm"
    assert sorted(os.listdir(tmp_path / "out" / "llm")) == ["config.json", "generation_config.json",
                                                           "model.safetensors", "tokenizer.json"]
    shutil.rmtree(own_llm)
    shutil.move(tmp_path / "out", tmp_path / "moved")
    model = load_model(tmp_path / "moved", device="cpu")
    torch.testing.assert_close(model.encode_text(export_runs["texts"]), expected, atol=0, rtol=0)


def test_errors_are_one_line_and_nothing_is_overwritten(export_runs, tmp_path, capsys):
    run = str(export_runs["root"] / "runs" / "stage2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"^error: .*full exists and is not empty; choose a new folder"):
        main([run, str(tmp_path / "full")])
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    with pytest.raises(SystemExit, match=r"^error: .*nope does not exist; pass a train.py run folder"):
        main([str(tmp_path / "nope"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"^error: the CLIP folder .*clip_moved of .* is not there .* --clip DIR"):
        main([run, str(tmp_path / "out"), "--clip", str(tmp_path / "clip_moved")])
    assert sorted(os.listdir(tmp_path)) == ["full"]  # no OUT, no temporary folder left behind
    (tmp_path / "empty").mkdir()  # an empty folder is taken
    export(run, str(tmp_path / "empty"))
    assert os.path.isfile(tmp_path / "empty" / "model.safetensors")
    with pytest.raises(Exception, match="exported folder and holds its own CLIP towers; clip= applies"):
        load_model(tmp_path / "empty", clip=export_runs["clip"])
    (tmp_path / "empty" / "proclip.json").write_text("{")
    with pytest.raises(Exception, match=r"proclip.json: not valid JSON .*; export the run again"):
        load_model(tmp_path / "empty")


def test_a_real_train_py_run_loads_exports_and_draws_its_curves(export_runs, tmp_path):
    """Stage 1 then stage 2 with --eval-every (4 steps each, ~3 s): what train.py really writes."""
    data, val = write_tiny_pairs(tmp_path / "data"), write_tiny_pairs(tmp_path / "data", n=8, seed=1, name="val.jsonl")
    common = ["--train-data", data, "--clip", export_runs["clip"], "--llm", export_runs["llm"], "--workers", "0",
              "--batch-size", "8", "--warmup", "2", "--max-steps", "4"]
    train.main(["--stage", "1", *common, "--output", str(tmp_path / "s1")])
    train.main(["--stage", "2", "--init", str(tmp_path / "s1"), *common, "--output", str(tmp_path / "s2"),
                "--val-data", val, "--eval-every", "2"])
    out = export(str(tmp_path / "s2"), str(tmp_path / "out"))
    model = load_model(tmp_path / "s2", device="cpu", dtype=torch.float32)  # transformers' reference runs in fp32
    assert model.meta["stage"] == 2 and model.meta["step"] == 4
    torch.testing.assert_close(model.encode_image(export_runs["images"]), hf_image_features(out, export_runs["images"])[0],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(load_model(out, device="cpu", dtype=torch.float32).encode_text(export_runs["texts"]),
                               model.encode_text(export_runs["texts"]), atol=0, rtol=0)
    panels = curve_panels(read_metrics(str(tmp_path / "s2" / "metrics.jsonl"))[0])
    assert [(title, len(series)) for title, series in panels] == [
        ("loss and its parts", 5), ("validation (--val-data)", 4), ("learning rate", 1)]  # R@1, R@5 both ways
    assert Image.open(write_curves(str(tmp_path / "s2"))).size[1] == 3 * PANEL_HEIGHT


def test_eval_py_takes_an_exported_folder(export_runs, tmp_path):
    """eval.py --model EXPORTED gives the run's own metrics; its texts are cached inside the exported folder."""
    run, out = export_runs["root"] / "runs" / "stage2", tmp_path / "exported"
    main([str(run), str(out)])
    reports = []
    for model, output in ((run, tmp_path / "run.json"), (out, None)):
        eval_cli.main(["--task", "retrieval", "--model", str(model), "--dataset", export_runs["dataset"], "--workers", "0",
                       "--batch-size", "4", "--ks", "1,5", *(["--output", str(output)] if output else [])])
        reports.append(json.loads((output or out / "eval_retrieval_set_export.json").read_text()))
    assert reports[1]["metrics"] == pytest.approx(reports[0]["metrics"], abs=1e-6)
    assert len(reports[0]["metrics"]) == 4 and (out / "text_cache.safetensors").is_file()
