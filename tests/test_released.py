"""Released LLM2CLIP/ProCLIP models: an eva_clip `.pt` built from a tiny open_clip model by renaming its keys to
eva_clip's spellings, with LLM2CLIP/ProCLIP's TextProj adapter (1 block x 8, 4 blocks x 2), gives the features of
the model it came from (image: open_clip's EVA02 / ViT; text: the adapter on llm2vec-llama3 embeddings), through
load_model and eval.py. And LLM2CLIP's LlamaBiModel LLM folders (no `model.` prefix) embed as llm2vec does."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from openclip_models import eva_config, import_references, tiny_timm, write_open_clip
from fixtures import TEXTS, llm2vec_encode, text_adaptor, write_tiny_llama3, write_tiny_pairs  # noqa: E402
from miniproclip import load_model
from miniproclip.embedder import EmbedSettings, LLMEmbedder
from miniproclip.metrics import retrieval_metrics
from miniproclip.weights import ModelFolderError

open_clip, timm = import_references()
transformers = pytest.importorskip("transformers")
from miniproclip import eval_cli  # eval.py's flags and flow
TOL = 1e-4
TO_EVA_CLIP = {"attn.q_proj.bias": "attn.q_bias", "attn.v_proj.bias": "attn.v_bias",
               "attn.norm.": "attn.inner_attn_ln.", "mlp.fc1_g.": "mlp.w1.", "mlp.fc1_x.": "mlp.w2.",
               "mlp.fc2.": "mlp.w3.", "mlp.norm.": "mlp.ffn_ln."}  # timm -> eva_clip, inside a block


def write_released_pt(path, clip_state, adaptor):
    """An eva_clip CustomCLIP checkpoint: `visual.*` in eva_clip's spellings (+ its rope tables), the adapter under
    `text.text_adaptor.`, `logit_scale`; wrapped in {"state_dict": ...} with DDP's `module.` as training saves it."""
    state = {"logit_scale": clip_state["logit_scale"]}
    for key, value in clip_state.items():
        if key.startswith("visual.trunk."):
            inner = key.removeprefix("visual.trunk.")
            for timm_name, eva_clip in TO_EVA_CLIP.items():
                inner = inner.replace(timm_name, eva_clip)
            state["visual." + inner] = value
    state["visual.rope.freqs_cos"] = state["visual.blocks.0.attn.rope.freqs_sin"] = torch.randn(196, 64)
    state.update({f"text.text_adaptor.{k}": v for k, v in adaptor.state_dict().items()})
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)


@pytest.fixture(scope="module")
def released_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    monkeypatch = pytest.MonkeyPatch()
    tiny_timm(monkeypatch)
    reference = write_open_clip(root / "eva", eva_config("eva02_base_patch16_clip_224"))
    monkeypatch.undo()
    data = write_tiny_pairs(root / "data", n=10)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    retrieval = root / "data" / "retrieval.jsonl"
    retrieval.write_text("".join(json.dumps({"image": r["image"], "captions": [r["caption"]]}) + "\n" for r in rows))
    return {"root": root, "reference": reference, "llm": write_tiny_llama3(root / "llama3"), "rows": rows,
            "retrieval": retrieval}


@pytest.mark.parametrize("blocks,ratio", [(1, 8), (4, 2)])  # ProCLIP's adapter, LLM2CLIP's
def test_released_pt_gives_the_features_of_its_source(released_models, tmp_path, blocks, ratio):
    adaptor = text_adaptor(32, 24, blocks, ratio)
    write_released_pt(tmp_path / "released.pt", released_models["reference"].state_dict(), adaptor)
    trained = load_model(tmp_path / "released.pt", llm=released_models["llm"], device="cpu", dtype=torch.float32)
    head = trained.model.text_head.config
    assert (head.num_blocks, head.mlp_ratio, head.normalize_input) == (blocks, ratio, blocks == 1)
    images = [str(released_models["root"] / "data" / r["image"]) for r in released_models["rows"]]
    pixels = torch.stack([trained.transform(Image.open(p)) for p in images])
    embeddings, _ = LLMEmbedder(released_models["llm"], EmbedSettings.preset("llm2vec-llama3")).embed(TEXTS)
    with torch.no_grad():
        image_ref = F.normalize(released_models["reference"].encode_image(pixels), dim=-1)
        # ProCLIP's TextProj normalises the LLM embedding first, LLM2CLIP's adapter takes it as it is
        text_ref = F.normalize(adaptor(F.normalize(embeddings, dim=-1) if blocks == 1 else embeddings), dim=-1)
    image = (trained.encode_image(images) - image_ref).abs().max()
    text = (trained.encode_text(TEXTS) - text_ref).abs().max()
    print(f"{blocks}x{ratio}: image {image:.2e}, text {text:.2e}")
    assert image < TOL and text < TOL
    assert trained.logit_scale.item() == pytest.approx(released_models["reference"].logit_scale.item())
    if blocks == 1:  # eval.py on the released model and its LLM: retrieval numbers from the reference features
        report = eval_cli.main(["--task", "retrieval", "--model", str(tmp_path / "released.pt"), "--llm", released_models["llm"],
                                "--dataset", str(released_models["retrieval"]), "--workers", "0", "--ks", "1,5"])
        captions = [r["caption"] for r in released_models["rows"]]
        with torch.no_grad():
            # eval.py's text cache is filled by the LLM in bf16, as for a released model's LLM by default
            embedder = LLMEmbedder(released_models["llm"], EmbedSettings.preset("llm2vec-llama3"), torch.bfloat16)
            text_ref = F.normalize(adaptor(F.normalize(embedder.embed(captions)[0], dim=-1)), dim=-1)
        expected = retrieval_metrics(image_ref, text_ref, torch.arange(len(captions)), ks=(1, 5))
        assert all(report["metrics"][k] == pytest.approx(expected[k], abs=1e-6) for k in expected)
        assert any(0 < v < 1 for v in expected.values())
        assert os.path.isfile(released_models["root"] / "data" / "text_cache_llama3.safetensors")  # beside the data


def test_bad_released_files_are_one_line_errors(released_models, tmp_path):
    adaptor = text_adaptor(32, 24, 1, 8)
    state = released_models["reference"].state_dict()
    write_released_pt(tmp_path / "cut.pt", state, adaptor)
    checkpoint = torch.load(tmp_path / "cut.pt", weights_only=True)
    del checkpoint["state_dict"]["module.visual.norm.weight"]
    torch.save(checkpoint, tmp_path / "cut.pt")
    with pytest.raises(ModelFolderError) as error:
        load_model(tmp_path / "cut.pt", llm=released_models["llm"], device="cpu")
    assert str(error.value) == (f"{tmp_path / 'cut.pt'}: weights do not match the model built from its config; 1 "
                                f"missing: vision_model.post_layernorm.weight; pass a released LLM2CLIP/ProCLIP "
                                f"checkpoint (an eva_clip CustomCLIP state dict with visual.* and text.text_adaptor.*) "
                                f"or an LLM2CLIP Hugging Face folder")
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(ModelFolderError, match=r"other.pt: no image tower and text adapter found \(KeyError: "):
        load_model(tmp_path / "other.pt", llm=released_models["llm"], device="cpu")
    write_released_pt(tmp_path / "ok.pt", state, adaptor)
    with pytest.raises(ModelFolderError, match=r"ok.pt is a released LLM2CLIP/ProCLIP model: pass the LLM"):
        load_model(tmp_path / "ok.pt", device="cpu")


def test_llama_bi_model_folder_embeds_as_llm2vec(tmp_path):
    """LLM2CLIP's LLM folders hold a LlamaModel (keys without `model.`): loaded as they are, bidirectional."""
    causal_lm = write_tiny_llama3(tmp_path / "causal_lm")
    transformers.LlamaForCausalLM.from_pretrained(causal_lm).model.save_pretrained(tmp_path / "bi")
    for name in ("tokenizer.json",):
        (tmp_path / "bi" / name).write_bytes((Path(causal_lm) / name).read_bytes())
    from safetensors import safe_open
    with safe_open(tmp_path / "bi" / "model.safetensors", "pt") as f:
        assert not any(k.startswith("model.") for k in f.keys())
    reference, _, _ = llm2vec_encode(str(tmp_path / "bi"), TEXTS)
    ours, _ = LLMEmbedder(str(tmp_path / "bi"), EmbedSettings.preset("llm2vec-llama3")).embed(TEXTS)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_llm2clip_hf_folder_gives_the_features_of_its_source(released_models, tmp_path):
    """LLM2CLIPModel's folder: HF CLIP vision names, `visual_projection`, `text_adapter.adaptor.N` (4 x 2)."""
    from fixtures import write_tiny_clip
    from safetensors.torch import load_file, save_file
    source = write_tiny_clip(tmp_path / "clip")  # HF CLIPModel: D = 16
    reference = transformers.CLIPModel.from_pretrained(source).eval()
    adaptor = text_adaptor(32, 16, 4, 2)
    folder = tmp_path / "llm2clip"
    folder.mkdir()
    weights = {k: v for k, v in load_file(Path(source) / "model.safetensors").items()
               if k.startswith(("vision_model.", "visual_projection.")) or k == "logit_scale"}
    weights.update({f"text_adapter.adaptor.{k}": v for k, v in adaptor.state_dict().items()})
    save_file(weights, folder / "model.safetensors")
    config = json.loads((Path(source) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"architectures": ["LLM2CLIPModel"], "model_type": "llm2clip",
                                                    "projection_dim": 16, "vision_config": config["vision_config"]}))
    (folder / "preprocessor_config.json").write_bytes((Path(source) / "preprocessor_config.json").read_bytes())
    trained = load_model(folder, llm=released_models["llm"], device="cpu", dtype=torch.float32)
    images = [str(released_models["root"] / "data" / r["image"]) for r in released_models["rows"][:4]]
    processor = transformers.CLIPImageProcessorPil.from_pretrained(source)
    pixels = torch.from_numpy(processor([Image.open(p) for p in images], return_tensors="np")["pixel_values"])
    embeddings, _ = LLMEmbedder(released_models["llm"], EmbedSettings.preset("llm2vec-llama3")).embed(TEXTS)
    with torch.no_grad():
        image_ref = F.normalize(reference.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text_ref = F.normalize(adaptor(embeddings), dim=-1)
    assert (trained.encode_image(images) - image_ref).abs().max() < TOL
    assert (trained.encode_text(TEXTS) - text_ref).abs().max() < TOL
