"""Reproduce ProCLIP's claims in small, on the toy world: train every variant with several seeds, evaluate, and
write RESULTS.md (mean ± std over seeds) and a PNG plot.

    python scripts/reproduce_toy.py                 # 3 seeds, the full toy world (CPU: see RESULTS.md for time)
    python scripts/reproduce_toy.py --quick         # the whole pipeline at tiny scale (CI smoke test)

Rows (paper section 4 and its ablations): the CLIP teacher; direct contrastive alignment of the LLM embedder
(LLM2CLIP-style: fresh LLM2CLIP head, InfoNCE only, no stage 1, no L_reg); ProCLIP after stage 1; ProCLIP; and
ProCLIP without L_struct (both stages), without L_reg, without stage 1; and, not in the paper, ProCLIP whose stage 1
leaves out the long captions the 77-token teacher sees cut (`--skip-truncated-long`). Every run uses train.py's
toy-world defaults (printed in RESULTS.md), changed only by the row's flags. Columns: zero-shot acc1 on the classes stage
2 trains on and on the held-out ones, and retrieval R@1 both ways on short, long and translated captions.
Stage 2 trains on `train_stage2.jsonl`, which lacks the held-out classes, so forgetting shows there.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train  # noqa: E402  (the repository's train.py, run in-process)
from miniproclip import evaluation  # noqa: E402
from miniproclip.checkpoint import resolve_checkpoint  # noqa: E402
from miniproclip.metrics import load_templates  # noqa: E402
from miniproclip.toy.world import LANGUAGES, build_toyworld  # noqa: E402

# name -> (stage-1 flags or None for no stage 1, stage-2 flags or None for no stage 2)
VARIANTS = {
    "CLIP teacher": (None, None),
    "direct alignment (LLM2CLIP-style)": (None, ["--init", "scratch", "--reg-weight", "0", "--head-blocks", "4",
                                                 "--head-mlp-ratio", "2"]),
    "ProCLIP stage 1 only": ([], None),
    "ProCLIP": ([], []),
    "ProCLIP w/o L_struct": (["--struct-weight", "0"], ["--struct-weight", "0"]),
    "ProCLIP w/o L_reg": ([], ["--reg-weight", "0"]),
    "ProCLIP w/o stage 1": (None, ["--init", "scratch"]),
    # not in the paper: stage 1 without the long captions the 77-token teacher sees cut (here: filler only)
    "ProCLIP, no cut captions in stage 1": (["--skip-truncated-long"], []),
}
RETRIEVAL_SETS = ["short", "long", *LANGUAGES]
COLUMNS = ["zs seen", "zs held-out"] + [f"{s} {d}" for s in RETRIEVAL_SETS for d in ("I→T", "T→I")]


TRAINED, REUSED = set(), set()  # runs this invocation trained / found finished (RESULTS.md times the former)


def run_training(stage, flags, out, common, log):
    """One train.py run into `out`, reused if it already finished (so an interrupted reproduction continues)."""
    if os.path.exists(os.path.join(out, "latest")):
        if out not in TRAINED:
            REUSED.add(out)
        return out
    log(f"train stage {stage} {' '.join(flags)} -> {out}")
    train.main(["--stage", str(stage), *flags, *common, "--output", out])
    TRAINED.add(out)
    return out


def evaluate(model_flags, toy_dir, workers):
    """One row of the table: {column: value}, from the runners eval.py uses, with the model loaded once."""
    kind, path = model_flags
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "amp_bf16" if device == "cuda" else "fp32"
    encoders = (evaluation.proclip_encoders(resolve_checkpoint(path), None, device, precision) if kind == "--model"
                else evaluation.clip_encoders(path, device, precision))
    zs_dir = os.path.join(toy_dir, "zeroshot")
    dataset = evaluation.read_image_folder(os.path.join(zs_dir, "test"), os.path.join(zs_dir, "classnames.txt"))
    templates = load_templates(os.path.join(zs_dir, "templates.json"))
    heldout = evaluation.read_lines(os.path.join(zs_dir, "heldout_classes.txt"))
    zs = evaluation.run_zeroshot(encoders, dataset, templates, 256, workers, device, heldout)["metrics"]
    row = {"zs seen": zs["acc1_seen"], "zs held-out": zs["acc1_heldout"]}
    for name in RETRIEVAL_SETS:
        retrieval = evaluation.read_retrieval_set(os.path.join(toy_dir, f"retrieval_{name}.jsonl"))
        metrics = evaluation.run_retrieval(encoders, retrieval, 256, workers, device, (1,))[0]["metrics"]
        row[f"{name} I→T"] = metrics["text_retrieval_recall@1"]
        row[f"{name} T→I"] = metrics["image_retrieval_recall@1"]
    return row


def table(results):
    """Markdown table of mean ± std (in %) over seeds."""
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, rows in results.items():
        cells = []
        for column in COLUMNS:
            values = [100 * r[column] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path):
    """Grouped bars (PIL only): zero-shot seen / held-out, and text-to-image R@1 on short and long captions and the
    languages' mean, per model. (PIL's default font has no arrows.)"""
    from PIL import Image, ImageDraw
    groups = {"zero-shot seen": lambda r: r["zs seen"], "zero-shot held-out": lambda r: r["zs held-out"],
              "short text-to-image": lambda r: r["short T→I"], "long text-to-image": lambda r: r["long T→I"],
              "languages text-to-image": lambda r: statistics.mean(r[f"{lang} T→I"] for lang in LANGUAGES)}
    colours = [(90, 90, 90), (220, 120, 40), (150, 150, 220), (40, 90, 200), (120, 180, 120), (200, 80, 80),
               (160, 100, 200), (60, 170, 170)]
    bar, gap, height, left = 14, 30, 260, 40
    width = left + len(groups) * (len(results) * bar + gap) + 260
    image = Image.new("RGB", (width, height + 60), "white")
    draw = ImageDraw.Draw(image)
    draw.line([(left, 20), (left, 20 + height)], fill="black")
    for tick in (0, 25, 50, 75, 100):
        y = 20 + height - tick * height / 100
        draw.text((5, y - 6), f"{tick}%", fill="black")
    for g, (title, value) in enumerate(groups.items()):
        x0 = left + 10 + g * (len(results) * bar + gap)
        for m, rows in enumerate(results.values()):
            v = statistics.mean(value(r) for r in rows)
            draw.rectangle([x0 + m * bar, 20 + height * (1 - v), x0 + (m + 1) * bar - 2, 20 + height], fill=colours[m])
        draw.text((x0, 25 + height), title, fill="black")
    for m, name in enumerate(results):
        y = 20 + m * 16
        draw.rectangle([width - 250, y, width - 240, y + 10], fill=colours[m])
        draw.text((width - 235, y - 2), name, fill="black")
    image.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (the world is seed 0)")
    p.add_argument("--quick", action="store_true", help="tiny world and few steps: checks the pipeline, not claims")
    p.add_argument("--toy-dir", default=None, help="default: toyworld (toyworld_quick with --quick)")
    p.add_argument("--runs", default=None, help="where the runs go (default: runs/reproduce[_quick])")
    p.add_argument("--output", default="RESULTS.md", help="the results page; the plot goes beside it as .png")
    p.add_argument("--workers", type=int, default=2, help="data loader processes of training (evaluation uses none)")
    p.add_argument("--llm", default=None, help="an HF LLM folder instead of converting SmolLM2 into the toy world")
    args = p.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    toy_dir = args.toy_dir or f"toyworld{suffix}"
    runs = args.runs or os.path.join("runs", f"reproduce{suffix}")
    started = time.time()
    manifest = build_toyworld(toy_dir, llm_dir=args.llm, quick=args.quick)
    schedule = (["--max-steps", "4", "--batch-size", "16"] if args.quick else [])
    results = {name: [] for name in VARIANTS}
    proclip_runs = None
    for seed in args.seeds:
        # no --train-data: train.py uses the toy world's files (train.jsonl, train_stage2.jsonl) and its defaults
        common = ["--toy-dir", toy_dir, "--seed", str(seed), "--workers", str(args.workers), *schedule,
                  *(["--llm", args.llm] if args.llm else [])]
        for name, (stage1, stage2) in VARIANTS.items():
            if stage1 is None and stage2 is None:
                model = ["--clip", os.path.join(toy_dir, "clip")]
            else:
                tag = "s1" + "".join(stage1).replace("--", "_") if stage1 is not None else None
                s1 = run_training(1, stage1, os.path.join(runs, f"seed{seed}", tag), common, print) if tag else None
                model = ["--model", s1]
                if stage2 is not None:
                    flags = stage2 if "scratch" in stage2 else ["--init", s1, *stage2]
                    out = os.path.join(runs, f"seed{seed}", name.replace(" ", "_").replace("/", ""))
                    model = ["--model", run_training(2, flags, out, common, print)]
                    proclip_runs = (s1, model[1]) if name == "ProCLIP" else proclip_runs
            results[name].append(evaluate(model, toy_dir, 0))
    minutes = (time.time() - started) / 60
    png = os.path.splitext(args.output)[0] + ".png"
    plot(results, png)
    write_results(args, results, minutes, png, settings_text(*proclip_runs))
    print(f"wrote {args.output} and {png} ({minutes:.1f} min)")


def settings_text(stage1_run, stage2_run):
    """The settings the ProCLIP row trained with, read back from its two runs' meta.json."""
    texts = []
    for stage, run in ((1, stage1_run), (2, stage2_run)):
        with open(os.path.join(run, "meta.json"), encoding="utf-8") as f:
            a = json.load(f)["args"]
        length = f"{a['max_steps']} steps" if a["max_steps"] else f"{a['epochs']} epochs"
        text = (f"stage {stage}: {length}, batch {a['batch_size']}, head lr {a['lr']:g}, wd {a['wd']:g}, "
                f"warmup {a['warmup']} steps then cosine, reduction {a['reduction']}")
        if stage == 2:
            text += (f", image-encoder lr {a['lr_vision']:g}, λ (reg weight) {a['reg_weight']:g}, EMA momentum "
                     f"{a['ema_momentum']:g} (1 = frozen initial image encoder)")
        texts.append(text)
    return "; ".join(texts) + f"; LLM {a['llm']} ({a['llm_dtype']} cache)."


def write_results(args, results, minutes, png, settings):
    """RESULTS.md: what ran, the table, the plot; a hand-written discussion below the marker is kept."""
    marker = "<!-- discussion: kept when the table is regenerated -->"
    kept = ""
    if os.path.exists(args.output):
        text = open(args.output, encoding="utf-8").read()
        kept = text[text.index(marker):] if marker in text else ""
    command = "python scripts/reproduce_toy.py" + (" --quick" if args.quick else "") + \
        f" --seeds {' '.join(map(str, args.seeds))}"
    with open(args.output, "w", encoding="utf-8") as f:
        reused = f" ({len(REUSED)} finished training runs reused from an earlier invocation)" if REUSED else ""
        f.write(f"# ProCLIP on the toy world\n\n`{command}`: {len(args.seeds)} seed(s), {minutes:.1f} minutes{reused}, "
                f"{time.strftime('%Y-%m-%d')}. Numbers are % (mean ± std over seeds); R@1 on the test split, "
                "zero-shot acc1 over all classes, split into the classes stage 2 trains on (seen) and the "
                "held-out ones.\n\n"
                "Settings (train.py's toy-world defaults, from the runs' meta.json): " + settings + "\n\n")
        f.write(table(results) + "\n\n")
        f.write(f"![summary]({os.path.basename(png)})\n\n")
        f.write(kept or marker + "\n")
    return args.output


if __name__ == "__main__":
    main()
