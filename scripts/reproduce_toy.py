"""Reproduce ProCLIP's claims in small, on the toy world: train every variant with several seeds, evaluate, and
write a results page (mean ± std over seeds, the claims and whether they hold) and a PNG plot.

    python scripts/reproduce_toy.py --split val      # validation: the numbers choices are made on
    python scripts/reproduce_toy.py --split test     # the second validation split
    python scripts/reproduce_toy.py --split locked   # the locked split: once per table, on a committed tree
    python scripts/reproduce_toy.py --quick          # the whole pipeline at tiny scale (CI smoke test)

Each seed has its own CLIP teacher and its own stage-0 embedder (seed 0: the toy world's own, which the default flow
trains; seeds 1, 2: trained here the same way with that seed), then its stages 1-2; the world (pictures, captions)
is one. Rows (paper section 4 and its ablations), on the seed's stage-0 embedder or the raw SmolLM2: the CLIP
teacher (a sanity row, not a claim); direct contrastive alignment of the LLM embedder (LLM2CLIP-style: fresh
LLM2CLIP head, InfoNCE only, no stage 1, no L_reg); ProCLIP after stage 1; ProCLIP; ablations. Every method trains on
the same captions (train_stage2.jsonl: no held-out class's word in them) with train.py's toy-world defaults,
changed only by the row's flags. Columns: zero-shot acc1 over all classes, the classes the methods train on (seen)
and the held-out ones, the row's image tower on the held-out classes read with CLIP's own text tower (what
the image side kept), and retrieval R@1 both ways on short, long and translated captions. Finished runs are
reused, so evaluating the same runs on another split, or rerunning after an interruption, trains nothing twice.
Every read of a split (not --quick) is appended to scripts/toy_split_reads.jsonl with its date and commit; the
results page lists them all.
"""

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from miniproclip import evaluation  # noqa: E402
from miniproclip.checkpoint import config_sections, resolve_checkpoint  # noqa: E402
from miniproclip.metrics import load_templates  # noqa: E402
from miniproclip.precision import default_precision  # noqa: E402
from miniproclip.training.curves import font  # noqa: E402
from miniproclip.toy import defaults as toy_defaults  # noqa: E402
from miniproclip.toy.embedder import build_toy_embedder  # noqa: E402
from miniproclip.toy.teacher import train_teacher  # noqa: E402
from miniproclip.toy.world import (LANGUAGES, TEACHER_STEPS, TEACHER_STEPS_QUICK, WORLD_VERSION,  # noqa: E402
                                   build_toyworld, eval_set_name, stage0_sources)
from miniproclip.training.loop import train_from_flags  # noqa: E402  (train.py's run, in-process)

READ_LOG = os.path.join(ROOT, "scripts", "toy_split_reads.jsonl")
# direct alignment: a fresh LLM2CLIP-style head (4 blocks), no L_reg, its head at 3e-4 (chosen on validation over the
# toy's 1e-3 for a fresh head: RESULTS.md, "Validation, second round")
DIRECT = ["--init", "scratch", "--reg-weight", "0", "--head-blocks", "4", "--head-mlp-ratio", "2", "--lr", "3e-4"]
# name -> (LLM: "raw" or "stage0", stage-1 flags or None for no stage 1, stage-2 flags or None for no stage 2)
VARIANTS = {
    "CLIP teacher": (None, None, None),
    "direct alignment (LLM2CLIP-style)": ("stage0", None, DIRECT),
    "ProCLIP stage 1 only": ("stage0", [], None),
    "ProCLIP": ("stage0", [], []),
    "ProCLIP w/o L_reg": ("stage0", [], ["--reg-weight", "0"]),
    "ProCLIP, raw LLM": ("raw", [], []),
    "direct alignment, raw LLM": ("raw", None, DIRECT),
    "ProCLIP w/o L_struct": ("stage0", ["--struct-weight", "0"], ["--struct-weight", "0"]),
    "ProCLIP w/o stage 1": ("stage0", None, ["--init", "scratch"]),
    # not in the paper: stage 2 shows short captions only (a long one in half the samples by default)
    "ProCLIP, stage 2 on short captions only": ("stage0", [], ["--long-prob", "0"]),
}
# run folders of the rows whose first words name another row's folder
RUN_NAMES = {"ProCLIP, raw LLM": "ProCLIP", "direct alignment, raw LLM": "direct_alignment",  # under RUNS/seedN/raw
             "ProCLIP, stage 2 on short captions only": "ProCLIP_short_only"}
CLAIM_ROWS = list(VARIANTS)[:6]  # the default rows: those the claims compare
RETRIEVAL_SETS = ["short", "long", *LANGUAGES]
# "image zs held-out": the row's image tower on the held-out classes, read with its seed's teacher text tower, which
# knows their words: what the image tower kept, whatever the text side can say
COLUMNS = ["zs all", "zs seen", "zs held-out", "image zs held-out"] + \
    [f"{s} {d}" for s in RETRIEVAL_SETS for d in ("I→T", "T→I")]


def r1(row, name):
    """Mean R@1 of both directions on one retrieval set ("languages": over de, fr, es, ja)."""
    sets = LANGUAGES if name == "languages" else [name]
    return statistics.mean(row[f"{s} {d}"] for s in sets for d in ("I→T", "T→I"))


DIRECT_ROW, STAGE1_ROW = "direct alignment (LLM2CLIP-style)", "ProCLIP stage 1 only"
# (claim, row A, row B, measure, margin): holds when A - B > margin in every seed (seed i of A against seed i of B).
# They mirror the paper: ProCLIP against direct alignment (its Tables 1-2 and XM3600), stage 2 against stage 1
# (its Table 6), L_reg (Table 7), and the embedder (LLM2CLIP's premise). R@1 of a few % is near chance (0.23% on
# 432 pictures) and within seed noise: hence 5-point margins where a claim says "adds".
CLAIMS = [
    ("(b) ProCLIP beats direct alignment: zero-shot, seen classes", "ProCLIP", DIRECT_ROW, lambda r: r["zs seen"], 0.0),
    ("(b) ProCLIP beats direct alignment: zero-shot, held-out classes", "ProCLIP", DIRECT_ROW,
     lambda r: r["zs held-out"], 0.0),
    ("(b) ProCLIP beats direct alignment: short R@1", "ProCLIP", DIRECT_ROW, lambda r: r1(r, "short"), 0.0),
    ("(d) ProCLIP beats direct alignment: long R@1", "ProCLIP", DIRECT_ROW, lambda r: r1(r, "long"), 0.0),
    ("(e) ProCLIP beats direct alignment: de/fr/es/ja R@1", "ProCLIP", DIRECT_ROW, lambda r: r1(r, "languages"), 0.0),
    ("(g) stage 2 adds 5 points of long R@1 to stage 1", "ProCLIP", STAGE1_ROW, lambda r: r1(r, "long"), 0.05),
    ("(g) stage 2 keeps stage 1's short R@1 (within 5 points)", "ProCLIP", STAGE1_ROW, lambda r: r1(r, "short"),
     -0.05),
    ("(c) L_reg keeps held-out-class accuracy", "ProCLIP", "ProCLIP w/o L_reg", lambda r: r["zs held-out"], 0.0),
    ("(c) L_reg keeps the image tower's held-out-class accuracy (CLIP's text tower)", "ProCLIP", "ProCLIP w/o L_reg",
     lambda r: r["image zs held-out"], 0.0),
    ("(f) stage 0 helps: long R@1, by 5 points", "ProCLIP", "ProCLIP, raw LLM", lambda r: r1(r, "long"), 0.05),
    ("(f) stage 0 helps: de/fr/es/ja R@1, by 5 points", "ProCLIP", "ProCLIP, raw LLM",
     lambda r: r1(r, "languages"), 0.05),
]
TRAINED, REUSED = set(), set()  # runs this invocation trained / found finished (the page times the former)


def run_training(stage, flags, out, common, log):
    """One train.py run into `out`, reused if it already finished (so an interrupted reproduction continues)."""
    if os.path.exists(os.path.join(out, "latest")):
        if out not in TRAINED:
            REUSED.add(out)
        return out
    log(f"train stage {stage} {' '.join(flags)} -> {out}")
    train_from_flags(["--stage", str(stage), *flags, *common, "--output", out], toy=toy_defaults)
    TRAINED.add(out)
    return out


def seed_models(seed, toy_dir, manifest, runs, quick, log) -> dict:
    """A seed's teacher, stage-0 embedder and its text cache: the toy world's own for seed 0 (what the default flow
    trains, with seed 0), else trained into RUNS/seed{seed}/ as the world trains its own, with `seed`."""
    if seed == 0:
        return {"clip": manifest["clip_dir"], "stage0": manifest["embedder_dir"], "cache": []}
    where = os.path.join(runs, f"seed{seed}")
    clip = os.path.join(where, "clip")
    if not os.path.isfile(os.path.join(clip, "model.safetensors")):
        log(f"seed {seed}: teacher -> {clip}")
        train_teacher(toy_dir, seed, TEACHER_STEPS_QUICK if quick else TEACHER_STEPS, log, out_dir=clip)
    stage0 = os.path.join(where, "stage0")
    if not os.path.isfile(os.path.join(stage0, "llm", "config.json")):  # else reused; an interrupted one starts again
        log(f"seed {seed}: stage-0 embedder -> {stage0}")
        build_toy_embedder(toy_dir, manifest["llm_dir"], quick, stage0_sources(toy_dir), log, output=stage0, seed=seed)
    return {"clip": clip, "stage0": os.path.join(stage0, "llm"),
            "cache": ["--text-cache", os.path.join(where, "text_cache_stage0_llm.safetensors")]}


def evaluate(model_flags, toy_dir, split, teacher):
    """One row of the table on `split`: {column: value}, from the runners eval.py uses, with the model loaded once;
    `teacher`: the seed's CLIP folder, whose text tower reads the row's image tower on the held-out classes."""
    kind, path = model_flags
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = default_precision(device)
    encoders = (evaluation.proclip_encoders(resolve_checkpoint(path), None, device, precision) if kind == "--model"
                else evaluation.clip_encoders(path, device, precision))
    zs_dir = os.path.join(toy_dir, "zeroshot")
    dataset = evaluation.read_image_folder(os.path.join(zs_dir, split), os.path.join(zs_dir, "classnames.txt"))
    templates = load_templates(os.path.join(zs_dir, "templates.json"))
    heldout = evaluation.read_lines(os.path.join(zs_dir, "heldout_classes.txt"))
    zs = evaluation.run_zeroshot(encoders, dataset, templates, 256, 0, device, heldout)["metrics"]
    image_zs = zs  # the teacher's row: its own text tower is the one that reads it
    if path != teacher:
        clip_text = evaluation.clip_encoders(teacher, device, precision)
        image_only = dataclasses.replace(encoders, encode_text=clip_text.encode_text, use_text_cache=None,
                                         prepare_texts=clip_text.prepare_texts, text_tag=None)
        image_zs = evaluation.run_zeroshot(image_only, dataset, templates, 256, 0, device, heldout)["metrics"]
    row = {"zs all": zs["acc1"], "zs seen": zs["acc1_seen"], "zs held-out": zs["acc1_heldout"],
           "image zs held-out": image_zs["acc1_heldout"]}
    for name in RETRIEVAL_SETS:
        retrieval = evaluation.read_retrieval_set(os.path.join(toy_dir, eval_set_name(split, name)))
        metrics = evaluation.run_retrieval(encoders, retrieval, 256, 0, device, (1,))[0]["metrics"]
        row[f"{name} I→T"] = metrics["text_retrieval_recall@1"]
        row[f"{name} T→I"] = metrics["image_retrieval_recall@1"]
    return row


def mean_std(values):
    values = [100 * v for v in values]
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def claims_table(results):
    """Markdown table of the claims: A, B, A - B (mean ± std over seeds, in points) and whether it holds."""
    lines = ["| claim | A | B | A − B | holds |", "|---|---|---|---|---|"]
    for claim, a, b, measure, margin in CLAIMS:
        if a not in results or b not in results:
            continue
        gaps = [measure(x) - measure(y) for x, y in zip(results[a], results[b])]
        verdict = "yes" if all(g > margin for g in gaps) else "no" if all(g <= margin for g in gaps) else "mixed"
        lines.append(f"| {claim} | {a}: {mean_std([measure(x) for x in results[a]])} | "
                     f"{b}: {mean_std([measure(y) for y in results[b]])} | {mean_std(gaps)} | {verdict} |")
    return "\n".join(lines)


def table(results):
    """Markdown table of mean ± std (in %) over seeds."""
    lines = ["| model | LLM | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for name, rows in results.items():
        llm = {"raw": "SmolLM2", "stage0": "stage 0", None: "-"}[VARIANTS[name][0]]
        lines.append(f"| {name} | {llm} | " + " | ".join(mean_std([r[c] for r in rows]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def plot(results, path):
    """Grouped bars (PIL only): zero-shot seen / held-out, and text-to-image R@1 on short and long captions and the
    languages' mean, per model. (The fonts have no arrows.)"""
    from PIL import Image, ImageDraw
    label_font = font(12)
    groups = {"zero-shot seen": lambda r: r["zs seen"], "zero-shot held-out": lambda r: r["zs held-out"],
              "short text-to-image": lambda r: r["short T→I"], "long text-to-image": lambda r: r["long T→I"],
              "languages text-to-image": lambda r: statistics.mean(r[f"{lang} T→I"] for lang in LANGUAGES)}
    colours = [(90, 90, 90), (240, 180, 120), (150, 190, 240), (220, 120, 40), (150, 150, 220), (40, 90, 200),
               (200, 80, 80), (160, 100, 200), (60, 170, 170), (180, 160, 60), (110, 60, 30)][:len(results)]
    bar, gap, height, left = 14, 30, 260, 40
    width = left + len(groups) * (len(results) * bar + gap) + 260
    image = Image.new("RGB", (width, height + 60), "white")
    draw = ImageDraw.Draw(image)
    draw.line([(left, 20), (left, 20 + height)], fill="black")
    for tick in (0, 25, 50, 75, 100):
        y = 20 + height - tick * height / 100
        draw.text((5, y - 6), f"{tick}%", fill="black", font=label_font)
    for g, (title, value) in enumerate(groups.items()):
        x0 = left + 10 + g * (len(results) * bar + gap)
        for m, rows in enumerate(results.values()):
            v = statistics.mean(value(r) for r in rows)
            draw.rectangle([x0 + m * bar, 20 + height * (1 - v), x0 + (m + 1) * bar - 2, 20 + height], fill=colours[m])
        draw.text((x0, 25 + height), title, fill="black", font=label_font)
    for m, name in enumerate(results):
        y = 20 + m * 16
        draw.rectangle([width - 250, y, width - 240, y + 10], fill=colours[m])
        draw.text((width - 235, y - 2), name, fill="black", font=label_font)
    image.save(path)


def commit_of_tree() -> tuple[str, bool]:
    """(HEAD's commit, whether the working tree differs from it), or ("unknown", True) outside a git clone."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return head.stdout.strip(), bool(status.stdout.strip())


def log_read(split, seeds, rows, commit, dirty) -> None:
    """Append this read of `split` to the read log (scripts/toy_split_reads.jsonl)."""
    entry = {"date": datetime.date.today().isoformat(), "split": split, "world": WORLD_VERSION, "commit": commit,
             "dirty": dirty, "seeds": seeds, "rows": rows}
    with open(READ_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def read_log_table() -> str:
    """Every logged read of every split, oldest first, as a markdown table."""
    if not os.path.isfile(READ_LOG):
        return "(no reads logged)"
    lines = ["| date | world | split | commit | seeds | rows | note |", "|---|---|---|---|---|---|---|"]
    with open(READ_LOG, encoding="utf-8") as f:
        for entry in map(json.loads, filter(str.strip, f)):
            rows = "all" if entry["rows"] is None else f"{len(entry['rows'])} rows"
            commit = entry["commit"][:7] + (" (uncommitted changes)" if entry.get("dirty") else "")
            lines.append(f"| {entry['date']} | v{entry['world']} | {entry['split']} | {commit} | "
                         f"{' '.join(map(str, entry['seeds']))} | {rows} | {entry.get('note', '')} |")
    return "\n".join(lines)


def settings_text(stage1_run, stage2_run):
    """The settings the ProCLIP row trained with, read back from its two runs' meta.json (the config's sections)."""
    texts = []
    for stage, run in ((1, stage1_run), (2, stage2_run)):
        with open(os.path.join(run, "meta.json"), encoding="utf-8") as f:
            config = config_sections(json.load(f))
        o, loss = config["optimizer"], config["loss"]
        length = f"{o['max_steps']} steps" if o["max_steps"] else f"{o['epochs']} epochs"
        text = (f"stage {stage}: {length}, batch {o['batch_size']}, head lr {o['lr']:g}, wd {o['wd']:g}, "
                f"warmup {o['warmup']} steps then cosine, reduction {loss['reduction']}")
        if stage == 1:
            text += ", long captions cut by the teacher " + ("left out" if loss["skip_truncated_long"] else "distilled")
        if stage == 2:
            text += (f", image-encoder lr {o['lr_vision']:g}, λ (reg weight) {loss['reg_weight']:g}, EMA momentum "
                     f"{loss['ema_momentum']:g} (1 = frozen initial image encoder)")
        texts.append(text)
    return "; ".join(texts) + f"; LLM {config['models']['llm']} ({config['precision']['llm_dtype']} cache)."


def write_results(args, results, minutes, png, settings):
    """The results page: what ran, the table, the claims, the plot, the read log; a hand-written discussion below the
    marker is kept."""
    marker = "<!-- discussion: kept when the table is regenerated -->"
    kept = ""
    if os.path.exists(args.output):
        text = open(args.output, encoding="utf-8").read()
        kept = text[text.index(marker):] if marker in text else ""
    command = "python scripts/reproduce_toy.py" + (" --quick" if args.quick else "") + \
        f" --split {args.split} --seeds {' '.join(map(str, args.seeds))}" + \
        (" --rows " + " ".join(f'"{row}"' for row in args.rows) if args.rows else "")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        reused = f" ({len(REUSED)} finished training runs reused from an earlier invocation)" if REUSED else ""
        f.write(f"# ProCLIP on the toy world ({args.split} split)\n\n`{command}` at commit {args.commit[:7]}: "
                f"{len(args.seeds)} seed(s), {minutes:.1f} minutes{reused}, {time.strftime('%Y-%m-%d')}. Numbers "
                f"are % (mean ± std over seeds) on the {args.split} split: zero-shot acc1 over all classes, over the "
                "classes the methods train on (seen) and over the held-out ones; retrieval R@1 image→text and "
                "text→image.\n\nSettings (train.py's toy-world defaults, from the runs' meta.json): " + settings +
                "\n\n")
        f.write(table(results) + "\n\n")
        f.write("Claims (R@1: mean of both directions; A − B in points, mean ± std over seeds; holds: A − B above "
                "the margin in every seed):\n\n" + claims_table(results) + "\n\n")
        f.write(f"![summary]({os.path.basename(png)})\n\n")
        f.write("Every read of a split, as scripts/toy_split_reads.jsonl logs it:\n\n" + read_log_table() + "\n\n")
        f.write(kept or marker + "\n")
    return args.output


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of teacher, stage 0 and stages 1-2")
    p.add_argument("--split", choices=("val", "test", "locked"), default="val",
                   help="val or test (validation: choices are made on them) or locked (once per table; needs a "
                        "committed tree)")
    p.add_argument("--rows", nargs="+", default=None, help="these rows (default: the rows the claims compare)")
    p.add_argument("--quick", action="store_true", help="tiny world and few steps: checks the pipeline, not claims")
    p.add_argument("--toy-dir", default=None, help="default: toyworld (toyworld_quick with --quick)")
    p.add_argument("--runs", default=None, help="where the runs go (default: runs/reproduce[_quick])")
    p.add_argument("--output", default=None, help="the results page (default: RESULTS.md on locked, "
                   "RUNS/RESULTS_<split>.md otherwise); the plot goes beside it as .png")
    p.add_argument("--workers", type=int, default=2, help="data loader processes of training (evaluation uses none)")
    p.add_argument("--llm", default=None, help="an HF LLM folder instead of converting SmolLM2 into the toy world")
    args = p.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    toy_dir = args.toy_dir or f"toyworld{suffix}"
    runs = args.runs or os.path.join("runs", f"reproduce{suffix}")
    args.output = args.output or ("RESULTS.md" if args.split == "locked" else
                                  os.path.join(runs, f"RESULTS_{args.split}.md"))
    rows = args.rows or CLAIM_ROWS
    unknown = set(rows) - set(VARIANTS)
    if unknown:
        p.error(f"--rows: no row named {', '.join(sorted(unknown))}; rows: {', '.join(VARIANTS)}")
    args.commit, dirty = commit_of_tree()
    if args.split == "locked" and dirty and not args.quick:
        p.error("--split locked reads the locked split, once per table: commit first, so that the read log names "
                "the code that ran")
    started = time.time()
    manifest = build_toyworld(toy_dir, llm_dir=args.llm, quick=args.quick)
    schedule = (["--max-steps", "4", "--batch-size", "16"] if args.quick else [])
    results = {name: [] for name in VARIANTS if name in rows}
    proclip_runs = None
    for seed in args.seeds:
        models = seed_models(seed, toy_dir, manifest, runs, args.quick, print)
        # no --train-data: train.py uses the toy world's files (train_stage2.jsonl) and its defaults
        common = ["--toy-dir", toy_dir, "--seed", str(seed), "--workers", str(args.workers), "--clip", models["clip"],
                  *schedule]
        for name in results:
            llm, stage1, stage2 = VARIANTS[name]
            if llm is None:
                results[name].append(evaluate(["--clip", models["clip"]], toy_dir, args.split, models["clip"]))
                continue
            where = os.path.join(runs, f"seed{seed}", llm)
            run_common = [*common, "--llm", models["stage0"], *models["cache"]] if llm == "stage0" else \
                [*common, "--llm", manifest["llm_dir"]]
            tag = "s1" + "".join(stage1).replace("--", "_") if stage1 is not None else None
            s1 = run_training(1, stage1, os.path.join(where, tag), run_common, print) if tag else None
            model = ["--model", s1]
            if stage2 is not None:
                flags = stage2 if "scratch" in stage2 else ["--init", s1, *stage2]
                out = os.path.join(where, RUN_NAMES.get(name) or name.replace(" ", "_").replace("/", "")
                                   .replace("(", "").replace(")", "").replace(",", ""))
                model = ["--model", run_training(2, flags, out, run_common, print)]
                proclip_runs = (s1, model[1]) if name == "ProCLIP" else proclip_runs
            results[name].append(evaluate(model, toy_dir, args.split, models["clip"]))
    if not args.quick:
        log_read(args.split, args.seeds, args.rows, args.commit, dirty)
    minutes = (time.time() - started) / 60
    png = os.path.splitext(args.output)[0] + ".png"
    plot(results, png)
    write_results(args, results, minutes, png, settings_text(*proclip_runs) if proclip_runs else "")
    print(f"wrote {args.output} and {png} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
