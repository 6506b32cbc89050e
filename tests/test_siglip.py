"""SigLIP towers (siglip.py) against transformers' SiglipModel and open_clip's timm-trunk SigLIP, on tiny random
models written here; the tokenizer, the preprocessing, training and eval.py on a SigLIP folder.

Tolerance: 1e-4 max abs difference in fp32 (same math, different kernels).
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from fixtures import WORDS
from miniproclip.backbones import load_clip, load_tokenizer, load_transform
from miniproclip.siglip import SigLIP
from miniproclip.weights import ModelFolderError

TOL = 1e-4
SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}  # Gemma's first ids (SigLIP2)


def write_tiny_siglip(folder, seed=0, image_size=32):
    """A tiny random HF SiglipModel folder with a Gemma-style word-level tokenizer.json (SigLIP2's specials) and
    SigLIP's preprocessor_config.json; returns (folder, transformers model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(vocab_size=64, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config = transformers.SiglipConfig(text_config=dict(**text, **tower),
                                       vision_config=dict(image_size=image_size, patch_size=8, **tower))
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # HF's constant inits, randomised so that a wrong mapping shows
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-7.0)
        model.vision_model.head.probe.normal_()
        model.vision_model.head.attention.in_proj_bias.normal_()
    model.save_pretrained(folder)
    vocab = {**SPECIALS, **{w: i + len(SPECIALS) for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GemmaTokenizer", "pad_token": "<pad>", "eos_token": "<eos>"}, f)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "SiglipImageProcessor", "do_resize": True, "do_rescale": True,
                   "do_normalize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,
                   "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, f)
    return str(folder), model


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    return write_tiny_siglip(tmp_path_factory.mktemp("siglip") / "siglip")


@pytest.mark.parametrize("size", [32, 48])  # the trained 4x4 grid, and 6x6 through interpolated positions
def test_features_match_transformers(siglip, size):
    folder, reference = siglip
    ours = load_clip(folder)
    assert isinstance(ours, SigLIP)
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    ids = torch.randint(0, 64, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs_image = reference.get_image_features(pixel_values=pixels, interpolate_pos_encoding=size != 32)
        theirs_text = reference.get_text_features(input_ids=ids)
        image, text = ours.encode_image(pixels), ours.encode_text(ids)
    assert image.shape == (3, 32) and text.shape == (3, 32)
    assert (image - theirs_image.pooler_output).abs().max() < TOL
    assert (text - theirs_text.pooler_output).abs().max() < TOL
    assert ours.logit_scale.item() == pytest.approx(2.3) and ours.logit_bias.item() == pytest.approx(-7.0)


def test_tokenizer_pads_the_window_after_eos(siglip, tmp_path):
    """SigLIP2 (Gemma vocabulary): lowercased, no BOS, EOS kept last when cut, `<pad>` to the 64-token window;
    SigLIP (`</s>`): punctuation removed as well (SiglipTokenizer.canonicalize_text), padded with `</s>`."""
    folder, _ = siglip
    tokens = load_tokenizer(folder)(["A  Photo of the RED cat", " ".join(["dog"] * 70)])
    word = lambda w: WORDS.index(w) + len(SPECIALS)
    expected = [word(w) for w in "a photo of the red cat".split()] + [1]
    assert tokens.input_ids.shape == (2, 64)
    assert tokens.input_ids[0].tolist() == expected + [0] * (64 - len(expected))
    assert tokens.input_ids[1].tolist() == [word("dog")] * 63 + [1] and tokens.truncated.tolist() == [False, True]
    # the SigLIP (v1) conventions, on the same words under SentencePiece-T5 specials
    from tokenizers import Tokenizer, models, pre_tokenizers
    v1 = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(v1, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(tmp_path / "v1")
    tokenizer.save(str(tmp_path / "v1" / "tokenizer.json"))
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(folder, name), tmp_path / "v1" / name)
    ids = load_tokenizer(str(tmp_path / "v1"))(["A red, dotted cat!"]).input_ids[0].tolist()
    assert ids == [v1[w] for w in "a red dotted cat".split()] + [1] * 60


def test_transform_equals_siglip_image_processor(siglip):
    """Squash resize to 32x32 (no crop), bicubic, rescale, mean = std = 0.5: transformers' PIL path, to fp32."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    folder, _ = siglip
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (57, 40, 3), dtype=np.uint8))
    theirs = SiglipImageProcessorPil.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"][0]
    ours = load_transform(folder)(image)
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert (ours - theirs).abs().max() < 1e-6


@pytest.fixture(scope="module")
def siglip_runs_world(siglip, tmp_path_factory):
    from fixtures import write_tiny_llm, write_tiny_pairs
    d = tmp_path_factory.mktemp("siglip_world")
    return {"clip": siglip[0], "llm": write_tiny_llm(d / "llm"), "data": write_tiny_pairs(d / "data")}


def test_stage1_then_stage2_train_on_a_siglip_tower(siglip_runs_world, tmp_path):
    """train.py --clip SIGLIP_DIR: stage 1 distils the SigLIP text tower (64 tokens) into the head, stage 2 tunes
    the SigLIP image tower (MAP head included; no visual projection) from SigLIP's own temperature."""
    import train
    from miniproclip import checkpoint as ckpt
    from fixtures import common, losses
    train.main(["--stage", "1", *common(siglip_runs_world, tmp_path / "s1", "--max-steps", "30", "--lr", "3e-3")])
    records = losses(tmp_path / "s1")
    assert sum(records[s]["loss"] for s in (28, 29, 30)) < 0.5 * sum(records[s]["loss"] for s in (1, 2, 3))
    train.main(["--stage", "2", "--init", str(tmp_path / "s1"), *common(siglip_runs_world, tmp_path / "s2", "--max-steps", "3",
                                                                      "--precision", "fp32")])
    records = losses(tmp_path / "s2")
    assert records[1]["reg"] < 1e-9 and records[3]["reg"] > 0.0  # the teacher is the initial SigLIP tower
    weights, meta = ckpt.load_weights(ckpt.resolve_checkpoint(str(tmp_path / "s2")))
    initial = load_clip(siglip_runs_world["clip"]).vision_model.state_dict()
    assert not any(k.startswith("visual_projection") for k in weights)
    assert not torch.equal(weights["vision_model.head.probe"], initial["head.probe"])  # the MAP head trained
    assert weights["logit_scale"].item() == pytest.approx(2.3, abs=0.01)  # 3 Adam steps of ≤1e-3
    # the export is a SiglipModel folder whose image features are the run's
    from miniproclip import load_model
    from miniproclip.export import export
    export(str(tmp_path / "s2"), str(tmp_path / "out"))
    exported = transformers.SiglipModel.from_pretrained(str(tmp_path / "out")).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    trained = load_model(str(tmp_path / "s2"), device="cpu")
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(exported.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        assert (trained.model.encode_image(pixels) - theirs).abs().max() < TOL


def test_sigmoid_loss_starts_from_the_siglip_scale_and_bias(siglip):
    """ProCLIP for --loss sigmoid on a SigLIP folder takes its own t and b (the test's SigLIP: log t 2.3, b -7)."""
    from miniproclip.head import HeadConfig
    from miniproclip.model import ProCLIP
    clip = load_clip(siglip[0])
    model = ProCLIP.from_clip(clip, HeadConfig(16, clip.config.projection_dim), logit_bias=True)
    assert model.logit_scale.item() == clip.logit_scale.item() == pytest.approx(2.3)
    assert model.logit_bias.item() == clip.logit_bias.item() == pytest.approx(-7.0)
    assert not hasattr(ProCLIP.from_clip(clip, HeadConfig(16, clip.config.projection_dim)), "logit_bias")


def test_eval_retrieval_equals_transformers_features(siglip, tmp_path):
    """eval.py --clip SIGLIP_DIR: its recalls equal those of transformers' SiglipModel features (processor: PIL
    SiglipImageProcessor; text: the same tokenizer.json, lowercased, EOS, `<pad>` to 64) put through the metric."""
    import importlib.util
    import torch.nn.functional as F
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from miniproclip.metrics import retrieval_metrics
    from fixtures import REPO, write_image
    folder, reference = siglip
    spec = importlib.util.spec_from_file_location("eval_cli", REPO / "eval.py")
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    entries, paths, texts = [], [], []
    for i in range(11):
        paths.append(str(tmp_path / "images" / f"im{i}.png"))
        write_image(paths[-1], seed=i)
        captions = [f"A photo of {WORDS[i]} {WORDS[i + 3]}", f"{WORDS[i + 1].upper()} and {WORDS[i]}"]
        texts += captions
        entries.append({"filename": f"im{i}.png", "split": "test", "sentences": [{"raw": c} for c in captions]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))
    out = tmp_path / "out.json"
    eval_cli.main(["--task", "retrieval", "--clip", folder, "--dataset", str(tmp_path / "karpathy.json"),
                   "--images", str(tmp_path / "images"), "--output", str(out), "--workers", "0", "--batch-size", "4",
                   "--precision", "fp32"])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    ids = torch.zeros(len(texts), 64, dtype=torch.long)  # <pad> = 0
    for row, text in enumerate(texts):
        words = tokenizer(text.lower(), add_special_tokens=False)["input_ids"] + [1]  # <eos> = 1
        ids[row, :len(words)] = torch.tensor(words)
    pixels = SiglipImageProcessorPil.from_pretrained(folder)([Image.open(p) for p in paths],
                                                             return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = F.normalize(reference.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = F.normalize(reference.get_text_features(input_ids=ids).pooler_output, dim=-1)
    expected = retrieval_metrics(image, text, torch.arange(11).repeat_interleave(2))
    report = json.loads(out.read_text())["metrics"]
    assert report.keys() == expected.keys() and any(0 < v < 1 for v in expected.values())
    assert all(report[k] == pytest.approx(expected[k], abs=1e-6) for k in expected)


def open_clip_siglip_config(text_act_tanh=True):
    """open_clip's ViT-B-16-SigLIP2 config, tiny: a timm vit_base_patch16_siglip trunk (made small by
    tiny_siglip_timm) and open_clip's bidirectional, last-token text tower."""
    text = {"context_length": 64, "vocab_size": 64, "width": 48, "heads": 4, "layers": 2, "no_causal_mask": True,
            "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
            "tokenizer_kwargs": {"clean": "canonicalize"}}
    if text_act_tanh:
        text["act_kwargs"] = {"approximate": "tanh"}
    return {"embed_dim": 128, "init_logit_bias": -10, "custom_text": True, "text_cfg": text,
            "vision_cfg": {"image_size": 32, "timm_model_name": "vit_base_patch16_siglip_224",
                           "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"}}


def tiny_siglip_timm(monkeypatch):
    """timm's SigLIP ViT at 128 wide (two 64-wide heads, as the base family), 2 blocks, 8px patches at 32px."""
    import timm
    create = timm.create_model
    tiny = {"embed_dim": 128, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: create(name, **{**kwargs, **tiny}))


@pytest.mark.parametrize("tanh", [True, False])  # SigLIP2's text GELU, and SigLIP's exact one
def test_open_clip_siglip_matches_open_clip(tmp_path, monkeypatch, tanh):
    from openclip_models import write_open_clip
    tiny_siglip_timm(monkeypatch)
    reference = write_open_clip(tmp_path, open_clip_siglip_config(tanh))
    ours = load_clip(str(tmp_path))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 64, (3, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        image, text = ours.encode_image(pixels), ours.encode_text(ids)
        assert (image - reference.encode_image(pixels)).abs().max() < TOL
        assert (text - reference.encode_text(ids)).abs().max() < TOL
    assert ours.logit_bias.item() == pytest.approx(reference.logit_bias.item())
    assert ours.logit_scale.item() == pytest.approx(reference.logit_scale.item())


def test_bad_siglip_folders_end_in_one_line(siglip, tmp_path, monkeypatch):
    """A SigLIP folder missing weights, an open_clip SigLIP with another pool, a NaFlex SigLIP2: one line naming
    the file and what to do."""
    from safetensors.torch import load_file, save_file
    from openclip_models import write_open_clip
    folder, _ = siglip
    os.makedirs(tmp_path / "cut")
    os.symlink(os.path.join(folder, "config.json"), tmp_path / "cut" / "config.json")
    weights = load_file(os.path.join(folder, "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("vision_model.head.")},
              str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(ModelFolderError) as missing:
        load_clip(str(tmp_path / "cut"))
    assert "\n" not in str(missing.value) and str(tmp_path / "cut") in str(missing.value)
    assert "vision_model.head.probe" in str(missing.value)
    assert "download the whole SiglipModel folder" in str(missing.value)
    tiny_siglip_timm(monkeypatch)
    write_open_clip(tmp_path / "oc", open_clip_siglip_config())
    path = tmp_path / "oc" / "open_clip_config.json"
    config = json.loads(path.read_text())
    config["model_cfg"]["vision_cfg"]["timm_pool"] = "avg"
    path.write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"open_clip_config.json: open_clip option vision_cfg.timm_pool='avg' "
                                               r"is not supported .*; use the open_clip_config.json that came"):
        load_clip(str(tmp_path / "oc"))
    naflex = json.loads(open(os.path.join(folder, "config.json")).read()) | {"model_type": "siglip2"}
    os.makedirs(tmp_path / "naflex")
    (tmp_path / "naflex" / "config.json").write_text(json.dumps(naflex))
    with pytest.raises(ModelFolderError, match="model_type 'siglip2'.*NaFlex is not supported"):
        load_clip(str(tmp_path / "naflex"))


def test_released_llm2clip_siglip2_pt(tmp_path, monkeypatch):
    """The layout LLM2CLIP's SigLIP2 release declares (its weights are not public here): a timm SigLIP trunk under
    `visual.trunk.` (timm_pool map), the adapter under `text.text_adaptor.`, logit_scale and logit_bias, as a
    state dict file. Image features equal open_clip's trunk; text features equal the adapter's."""
    import torch.nn.functional as F
    from openclip_models import write_open_clip
    from fixtures import text_adaptor
    from miniproclip.released import load_released, released_transform
    tiny_siglip_timm(monkeypatch)
    reference = write_open_clip(tmp_path / "oc", open_clip_siglip_config())
    adaptor = text_adaptor(32, 128, 4, 2)  # LLM2CLIP's 4 blocks x 2, into the 128-wide joint space
    state = {k: v for k, v in reference.state_dict().items() if k.startswith("visual.") or k.startswith("logit_")}
    state.update({f"text.text_adaptor.{k}": v for k, v in adaptor.state_dict().items()})
    torch.save(state, tmp_path / "llm2clip-siglip2.pt")
    model = load_released(str(tmp_path / "llm2clip-siglip2.pt"))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    llm = torch.randn(3, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (model.encode_image(pixels) - F.normalize(reference.encode_image(pixels), dim=-1)).abs().max() < TOL
        assert (model.encode_text(llm) - F.normalize(adaptor(llm), dim=-1)).abs().max() < TOL
    assert model.logit_scale.item() == pytest.approx(reference.logit_scale.item())
    transform = released_transform(str(tmp_path / "llm2clip-siglip2.pt"), model)
    assert (transform.size, transform.crop_size, transform.mean) == ((32, 32), None, (0.5,) * 3)
