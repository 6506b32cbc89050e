"""Reproduce ProCLIP's claims in small, on the toy world: train every variant with several seeds, evaluate, and
write RESULTS.md (mean ± std over seeds) and a PNG plot.

    python scripts/reproduce_toy.py                 # 3 seeds, the full toy world (CPU: see RESULTS.md for time)
    python scripts/reproduce_toy.py --quick         # the whole pipeline at tiny scale (CI smoke test)

Rows (paper section 4 and its ablations): the CLIP teacher; direct contrastive alignment of the LLM embedder
(LLM2CLIP-style: fresh LLM2CLIP head, InfoNCE only, no stage 1, no L_reg); ProCLIP after stage 1; ProCLIP; and
ProCLIP without L_struct (both stages), without L_reg, without stage 1. Columns: zero-shot acc1 on the classes stage
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

import eval as eval_cli  # noqa: E402  (the repository's eval.py and train.py, run in-process)
import train  # noqa: E402
from miniproclip.toyworld import LANGUAGES, build_toyworld  # noqa: E402

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
}
RETRIEVAL_SETS = ["short", "long", *LANGUAGES]
COLUMNS = ["zs seen", "zs held-out"] + [f"{s} {d}" for s in RETRIEVAL_SETS for d in ("I→T", "T→I")]


def run_training(stage, flags, out, common, log):
    """One train.py run into `out`, reused if it already finished (so an interrupted reproduction continues)."""
    if os.path.exists(os.path.join(out, "latest")):
        return out
    log(f"train stage {stage} {' '.join(flags)} -> {out}")
    train.main(["--stage", str(stage), *flags, *common, "--output", out])
    return out


def evaluate(model_flags, toy_dir, workers):
    """One row of the table: {column: value} from eval.py's zero-shot and retrieval runs."""
    base = [*model_flags, "--toy-dir", toy_dir, "--workers", str(workers), "--output", os.devnull]
    row = {}
    zs = eval_cli.main(["--task", "zeroshot", *base])["metrics"]
    row["zs seen"], row["zs held-out"] = zs["acc1_seen"], zs["acc1_heldout"]
    for name in RETRIEVAL_SETS:
        metrics = eval_cli.main(["--task", "retrieval", "--dataset", name, "--ks", "1", *base])["metrics"]
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
    """Grouped bars (PIL only): zero-shot seen / held-out, long T→I and the languages' mean T→I, per model."""
    from PIL import Image, ImageDraw
    groups = {"zero-shot seen": lambda r: r["zs seen"], "zero-shot held-out": lambda r: r["zs held-out"],
              "long T→I R@1": lambda r: r["long T→I"],
              "languages T→I R@1": lambda r: statistics.mean(r[f"{lang} T→I"] for lang in LANGUAGES)}
    colours = [(90, 90, 90), (220, 120, 40), (150, 150, 220), (40, 90, 200), (120, 180, 120), (200, 80, 80),
               (160, 100, 200)]
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
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--llm", default=None, help="an HF LLM folder instead of converting SmolLM2 into the toy world")
    args = p.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    toy_dir = args.toy_dir or f"toyworld{suffix}"
    runs = args.runs or os.path.join("runs", f"reproduce{suffix}")
    started = time.time()
    manifest = build_toyworld(toy_dir, llm_dir=args.llm, quick=args.quick)
    data = {1: os.path.join(toy_dir, "train.jsonl"), 2: os.path.join(toy_dir, "train_stage2.jsonl")}
    schedule = (["--max-steps", "4", "--batch-size", "16"] if args.quick else [])
    results = {name: [] for name in VARIANTS}
    for seed in args.seeds:
        def common(stage):
            return ["--toy-dir", toy_dir, "--train-data", data[stage], "--clip", os.path.join(toy_dir, "clip"),
                    "--llm", manifest["llm_dir"], "--seed", str(seed), "--workers", str(args.workers),
                    "--text-cache", os.path.join(toy_dir, "text_cache.safetensors"), *schedule]
        for name, (stage1, stage2) in VARIANTS.items():
            if stage1 is None and stage2 is None:
                model = ["--clip", os.path.join(toy_dir, "clip")]
            else:
                tag = "s1" + "".join(stage1).replace("--", "_") if stage1 is not None else None
                s1 = run_training(1, stage1, os.path.join(runs, f"seed{seed}", tag), common(1), print) if tag else None
                model = ["--model", s1]
                if stage2 is not None:
                    flags = stage2 if "scratch" in stage2 else ["--init", s1, *stage2]
                    out = os.path.join(runs, f"seed{seed}", name.replace(" ", "_").replace("/", ""))
                    model = ["--model", run_training(2, flags, out, common(2), print)]
            results[name].append(evaluate(model, toy_dir, args.workers))
    minutes = (time.time() - started) / 60
    png = os.path.splitext(args.output)[0] + ".png"
    plot(results, png)
    write_results(args, results, minutes, png)
    print(f"wrote {args.output} and {png} ({minutes:.1f} min)")


def write_results(args, results, minutes, png):
    """RESULTS.md: what ran, the table, the plot; a hand-written discussion below the marker is kept."""
    marker = "<!-- discussion: kept when the table is regenerated -->"
    kept = ""
    if os.path.exists(args.output):
        text = open(args.output, encoding="utf-8").read()
        kept = text[text.index(marker):] if marker in text else ""
    command = "python scripts/reproduce_toy.py" + (" --quick" if args.quick else "") + \
        f" --seeds {' '.join(map(str, args.seeds))}"
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(f"# ProCLIP on the toy world\n\n`{command}`: {len(args.seeds)} seed(s), {minutes:.1f} minutes, "
                f"{time.strftime('%Y-%m-%d')}. Numbers are % (mean ± std over seeds); R@1 on the test split, "
                "zero-shot acc1 over all classes, split into the classes stage 2 trains on (seen) and the "
                "held-out ones.\n\n")
        f.write(table(results) + "\n\n")
        f.write(f"![summary]({os.path.basename(png)})\n\n")
        f.write(kept or marker + "\n")
    return args.output


if __name__ == "__main__":
    main()
