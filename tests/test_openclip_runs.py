"""open_clip folders wherever a model goes in: eval.py --clip, train.py --clip (stage 2 on an EVA02 tower),
load_model on the run, and its export in open_clip's own format (open_clip loads it back)."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from openclip_models import eva_config, import_references, tiny_timm, vit_config, write_open_clip
import train
from fixtures import write_tiny_llm, write_tiny_pairs
from miniproclip import checkpoint as ckpt
from miniproclip import load_model
from miniproclip.export import export
from miniproclip.metrics import retrieval_metrics

open_clip, timm = import_references()
pytest.importorskip("transformers")  # the tiny LLM is written by transformers
from miniproclip import eval_cli  # eval.py's flags and flow


@pytest.fixture(scope="module")
def openclip_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("openclip_runs")
    data = write_tiny_pairs(root / "data")
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()][:12]
    retrieval = root / "data" / "retrieval.jsonl"
    retrieval.write_text("".join(json.dumps({"image": r["image"], "captions": [r["caption"]]}) + "\n" for r in rows))
    return {"root": root, "data": data, "rows": rows, "retrieval": retrieval, "llm": write_tiny_llm(root / "llm")}


@pytest.mark.parametrize("tower", ["vit", "eva02"])
def test_eval_retrieval_on_an_open_clip_folder_matches_open_clip(openclip_data, tmp_path, monkeypatch, tower):
    tiny_timm(monkeypatch)
    config = vit_config() if tower == "vit" else eva_config("eva02_base_patch16_clip_224")
    reference = write_open_clip(tmp_path / tower, config, {"interpolation": "bicubic", "resize_mode": "shortest"})
    report = eval_cli.main(["--task", "retrieval", "--clip", str(tmp_path / tower), "--dataset",
                            str(openclip_data["retrieval"]), "--workers", "0", "--batch-size", "4", "--ks", "1,5",
                            "--precision", "fp32"])  # open_clip's reference runs in fp32
    # the reference: open_clip's own preprocessing, tokenizer and model
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / tower}")
    images = torch.stack([preprocess(Image.open(openclip_data["root"] / "data" / r["image"])) for r in openclip_data["rows"]])
    ids = open_clip.get_tokenizer("ViT-B-32")([r["caption"] for r in openclip_data["rows"]])
    with torch.no_grad():
        image = F.normalize(reference.encode_image(images), dim=-1)
        text = F.normalize(reference.encode_text(ids), dim=-1)
    expected = retrieval_metrics(image, text, torch.arange(len(openclip_data["rows"])), ks=(1, 5))
    assert report["metrics"].keys() == expected.keys()
    assert all(report["metrics"][k] == pytest.approx(expected[k], abs=1e-6) for k in expected)
    assert any(0 < v < 1 for v in expected.values())  # not a degenerate gallery


def common(openclip_data, clip, out, *extra):
    return ["--train-data", openclip_data["data"], "--clip", clip, "--llm", openclip_data["llm"], "--output", str(out),
            "--workers", "0", "--batch-size", "8", "--warmup", "1", *extra]


def test_stage2_trains_an_eva02_tower_then_loads_and_exports(openclip_data, tmp_path, monkeypatch):
    tiny_timm(monkeypatch)
    clip = str(tmp_path / "eva")
    write_open_clip(clip, eva_config("eva02_base_patch16_clip_224"))
    train.main(["--stage", "1", *common(openclip_data, clip, tmp_path / "s1", "--max-steps", "1")])
    # the live teacher (fp32: in bf16, rounding alone would make step 1's L_reg nonzero) (random crops), then the cached image teacher (centre crop, frozen)
    for name, extra in [("s2", ()), ("s2_cached", ("--train-crop", "center"))]:
        train.main(["--stage", "2", "--init", str(tmp_path / "s1"),
                    *common(openclip_data, clip, tmp_path / name, "--max-steps", "2", "--precision", "fp32", *extra)])
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert records[0]["reg"] < 1e-9 and records[1]["reg"] > 1e-6  # L_reg: the tower left its teacher copy
    assert any(p.name.startswith("clip_image_") for p in (Path(openclip_data["data"]).parent).iterdir())  # the cached v̂
    weights, meta = ckpt.load_weights(ckpt.resolve_checkpoint(str(tmp_path / "s2")))
    initial = open_clip.create_model(f"local-dir:{clip}").visual.trunk.state_dict()
    key, theirs = "vision_model.encoder.layers.1.mlp.gate_proj.weight", "blocks.1.mlp.fc1_g.weight"
    assert meta["stage"] == 2 and not torch.equal(weights[key], initial[theirs])  # the EVA02 tower trained
    # the run as load_model reads it, and its export in open_clip's format, which open_clip itself loads
    trained = load_model(tmp_path / "s2", device="cpu")
    exported = export(str(tmp_path / "s2"), str(tmp_path / "exported"))
    assert sorted(os.listdir(exported)) == ["open_clip_config.json", "open_clip_model.safetensors", "proclip.json",
                                            "text_head.safetensors"]
    reloaded = open_clip.create_model(f"local-dir:{exported}").eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trained.model.encode_image(pixels)
        assert (ours - F.normalize(reloaded.encode_image(pixels), dim=-1)).abs().max() < 1e-4
        assert (ours - load_model(exported, device="cpu").model.encode_image(pixels)).abs().max() < 1e-4
    images = [str(openclip_data["root"] / "data" / r["image"]) for r in openclip_data["rows"][:2]]
    assert torch.allclose(trained.encode_image(images), load_model(exported, device="cpu").encode_image(images),
                          atol=1e-5)
