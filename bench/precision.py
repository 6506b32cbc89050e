"""bf16 against fp32 on the CPU (issue 21): step time of each training stage and of eval's encoders, side by side.

Each row builds the same seeded model twice, once as train.py/eval.py run it under `--precision fp32` and once
under `--precision amp_bf16`, and times the two alternately in this process (bench/common.interleaved_times):
- stage 0: SmolLM2-135M (the real weights) with LoRA r 16 on q, k, v, o, gate, up, down, a caption-contrastive
  step on 32 pairs of token-id texts (64 texts of `--tokens` tokens): frozen base in fp32, or in bf16 under
  autocast (stage0.setup_stage0), fp32 adapters, SDPA's math kernel (stages.attention_for_training), mean pool,
  symmetric InfoNCE, backward, AdamW;
- stage 1: ProCLIP's head (1 block, r 8, SmolLM2's 576 -> 64) on a batch of 64 cached LLM embeddings (plus 64
  long ones), L_ins + L_struct against cached teacher features, backward, AdamW;
- stage 2: the toy world's image tower (4 layers of width 64, 64-px pictures) and a ViT-B/16 tower, each with the
  head and its frozen teacher copy for L_reg, InfoNCE + L_reg, backward, clipping, AdamW (batch 64 and 8);
- eval: image encoding (both towers, batch 64 and 8) and text encoding (SmolLM2 mean-pooled, then the head; 64
  captions of `--tokens` tokens) under inference mode, fp32 weights under autocast as api.TrainedModel runs
  them, the LLM's weights in the compute dtype as embedder.LLMEmbedder holds them.
The last column is the op with the most self CPU time in one bf16 call (torch.profiler) and its share.

    python bench/precision.py            # this CPU, torch's threads
    python bench/precision.py --quick    # tiny shapes (the CI smoke test)
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.profiler import profile

import common  # bench/common.py; also puts the repository on sys.path
import train_step  # bench/train_step.py: the stage-2 step
from miniproclip.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from miniproclip.head import HeadConfig
from miniproclip.llm import DecoderLM, LLMConfig, mean_pool
from miniproclip.lora import apply_lora
from miniproclip.losses import ClipLoss
from miniproclip.model import ProCLIP
from miniproclip.precision import autocast, compute_dtype
from miniproclip.toy.teacher import toy_clip_config
from miniproclip.training.stages import HeadOnly, LossSettings, attention_for_training, stage1_loss

PRECISIONS = ("fp32", "amp_bf16")


def llm(quick: bool, dtype: torch.dtype) -> DecoderLM:
    """SmolLM2-135M (the real weights), or a two-layer Llama of its layout for --quick."""
    if not quick:
        return DecoderLM.from_pretrained(str(common.smollm2_folder()), dtype=dtype)
    torch.manual_seed(0)
    config = LLMConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return DecoderLM(config).to(dtype).eval()


def vit_b16(quick: bool) -> CLIPConfig:
    if quick:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=64, patch_size=16)
    else:
        vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=16)
    return CLIPConfig(vision=vision, text=CLIPTextConfig(), projection_dim=512)


# ----------------------------------------------------------------------------- one closure per row and precision

def stage0_step(precision: str, args):
    """train.py --stage 0's step: the base in bf16 under amp_bf16 (setup_stage0), fp32 LoRA adapters."""
    model = llm(args.quick, torch.bfloat16 if precision == "amp_bf16" else torch.float32)
    torch.manual_seed(0)
    apply_lora(model.train(), 16, 32.0, 0.0)
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=1e-4)
    ids = torch.randint(10, model.config.vocab_size, (64, args.tokens), generator=torch.Generator().manual_seed(0))
    mask, clip_loss = torch.ones_like(ids), ClipLoss()

    def step():
        with autocast("cpu", precision), attention_for_training("cpu"):
            hidden = model(ids, mask)  # (64, T, C)
        pooled = F.normalize(mean_pool(hidden, mask), dim=-1)  # (64, C) fp32
        loss = clip_loss(pooled[:32], pooled[32:], torch.tensor(50.0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def stage1_step(precision: str, args):
    """Stage1's step without its caches: the head on 64 short + 64 long LLM embeddings, L_ins + L_struct."""
    torch.manual_seed(0)
    llm_dim = 64 if args.quick else 576
    text_side = HeadOnly(ProCLIP(toy_clip_config(), HeadConfig(llm_dim, 64))).train()  # what Stage1 trains
    optimizer = torch.optim.AdamW(text_side.parameters(), lr=1e-3)
    embeddings, teacher = torch.randn(128, llm_dim), F.normalize(torch.randn(128, 64), dim=-1)
    settings = LossSettings()

    def step():
        with autocast("cpu", precision):
            student = text_side(embeddings)  # (128, 64)
        f = {"student_short": student[:64], "teacher_short": teacher[:64],
             "student_long": student[64:], "teacher_long": teacher[64:]}
        loss, _ = stage1_loss(f, settings)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def stage2_step(config: CLIPConfig, batch: int, llm_dim: int):
    """Stage2's step (bench/train_step.stage2_step): the whole image tower and the head train; the teacher copy
    runs under the same autocast."""
    def build(precision: str, args):
        return train_step.stage2_step(config, batch, llm_dim, torch.device("cpu"), precision)[0]
    return build


def image_encoding(config: CLIPConfig, batch: int):
    def build(precision: str, args):
        """eval.py's image side (api.TrainedModel): fp32 weights under the precision's autocast, inference mode."""
        torch.manual_seed(0)
        model = ProCLIP(config, HeadConfig(64, config.projection_dim)).eval()
        pixels = torch.randn(batch, 3, config.vision.image_size, config.vision.image_size)

        def encode():
            with torch.inference_mode(), autocast("cpu", precision):
                model.encode_image(pixels)
        return encode
    return build


def text_encoding(precision: str, args):
    """eval.py's text side for captions not in a cache: the LLM embedder with its weights in the compute dtype
    (embedder.LLMEmbedder; bf16 is the cache's default on CPU), mean pool, then the head under autocast."""
    model = llm(args.quick, compute_dtype(precision))
    torch.manual_seed(0)
    text_side = HeadOnly(ProCLIP(toy_clip_config(), HeadConfig(model.config.hidden_size, 64))).eval()
    ids = torch.randint(10, model.config.vocab_size, (64, args.tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def encode():
        with torch.inference_mode(), autocast("cpu", precision):
            text_side(mean_pool(model(ids, mask), mask))  # (64, 64)
    return encode


# ----------------------------------------------------------------------------- the table

def dominant_op(fn) -> str:
    """The aten op with the most self CPU time in one call of `fn`, and its share of the call's self time (that of
    every profiled event, Python-level ranges such as the optimizer's step included)."""
    with profile() as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    top = max((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total)
    return f"{top.key} {100 * top.self_cpu_time_total / total:.0f}%"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_machine_args(parser)
    parser.add_argument("--tokens", type=int, default=24, help="tokens per text (stage 0, text encoding)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device, _ = common.setup(args)
    if device.type != "cpu":
        parser.error("this benchmark compares precisions on the CPU (bench/gpu_check.py covers the GPU)")
    llm_dim, toy = 64 if args.quick else 576, toy_clip_config()
    vit, vit_batch = vit_b16(args.quick), 2 if args.quick else 8
    rows = [("stage 0 step, SmolLM2 + LoRA, 64 texts", stage0_step), ("stage 1 step, head, batch 64 + 64 long",
                                                                       stage1_step),
            ("stage 2 step, toy tower, batch 64", stage2_step(toy, 64, llm_dim)),
            (f"stage 2 step, ViT-B/16, batch {vit_batch}", stage2_step(vit, vit_batch, llm_dim)),
            ("eval image encoding, toy tower, batch 64", image_encoding(toy, 64)),
            (f"eval image encoding, ViT-B/16, batch {vit_batch}", image_encoding(vit, vit_batch)),
            ("eval text encoding, SmolLM2 + head, 64 captions", text_encoding)]
    if args.quick:
        rows = [(label.replace("SmolLM2", "tiny Llama").replace("ViT-B/16", "tiny ViT"), build)
                for label, build in rows]
    table = []
    for label, build in rows:
        contenders = {precision: build(precision, args) for precision in PRECISIONS}
        times = common.interleaved_times(contenders, device, warmup=1 if args.quick else 2,
                                         repeats=2 if args.quick else args.repeats)
        fp32, bf16 = (statistics.median(times[p]) * 1e3 for p in PRECISIONS)
        table.append([label, f"{fp32:.2f}", f"{bf16:.2f}", common.ratio_summary(times["fp32"], times["amp_bf16"]),
                      dominant_op(contenders["amp_bf16"])])
        print(" | ".join(table[-1]), flush=True)
    print(common.markdown_table(["work", "fp32 ms", "amp_bf16 ms", "speed-up fp32/bf16 (range)",
                                 "top op under bf16 (self CPU share)"], table))
    print(f"tokens per text {args.tokens}; median of {args.repeats} interleaved calls per side after warm-up")
    print(common.machine_line(device, torch.float32))


if __name__ == "__main__":
    main()
