"""eval.py's flags and flow: zero-shot retrieval and classification of a CLIP or ProCLIP model (usage: eval.py).

`main(argv)` is `python eval.py ARGV`; `parse_args`, `fill_defaults` (the newest run, the toy world's test split),
`evaluate` (the model and data, then the task's runner) and the report are importable here (tests, scripts). The
readers and runners live in evaluation.py, the metric definitions (LAION-AI/CLIP_benchmark's) in metrics.py.
"""

import argparse
import json
import os
import re
import shlex

import torch

from . import evaluation
from .api import EXPORT_JSON
from .benchmarks import suite
from .checkpoint import LATEST, resolve_checkpoint
from .embed import text_cache_path
from .errors import UserError, exit_with
from .metrics import load_templates
from .precision import PRECISIONS, default_precision, describe
from .released import is_released


SUITE_FLAGS = {  # the benchmark suite's options that name a folder or a choice
    "--data-root": "the folder holding flickr30k/, coco/, imagenet1k/, ... (folder names matched case-insensitively); "
                   "with --dataset NAME, that one benchmark",
    "--cache-dir": "suite: the LLM text caches, one per benchmark and LLM (default: DATA_ROOT/.cache)",
    "--paper-rows": "suite: the paper's rows shown beside ours (B/16-3M, L/14-30M, L/14-3M, EVA02-L/14-3M; default: "
                    "inferred from a ViT-B/16 CLIP)",
    "--dci-split": "suite: one DCI split of splits.json (default: all, as FLAME)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Zero-shot retrieval and classification with CLIP_benchmark's metrics.")
    p.add_argument("--task", choices=("retrieval", "zeroshot"), default=None, help="required without --data-root")
    # model (default: the newest run under --runs)
    p.add_argument("--clip", default=None, help="a Hugging Face CLIP folder or an open_clip folder (ViT, EVA02-CLIP): "
                                                "the baseline")
    p.add_argument("--model", default=None, help="a ProCLIP run folder (its latest checkpoint), checkpoint file, "
                   "exported folder (python -m miniproclip.export), or released LLM2CLIP/ProCLIP model (with --llm)")
    p.add_argument("--llm", default=None, help="--model: the LLM folder (needed by a released LLM2CLIP/ProCLIP model; "
                   "for a run, when the one it names has moved)")
    p.add_argument("--runs", default="runs", help="where the newest run is looked for when neither model flag is given")
    p.add_argument("--text-cache", default=None, help="--model: LLM embedding cache (default: the training one; for "
                   "an exported folder, text_cache.safetensors inside it)")
    # data (default: the toy world's test split)
    p.add_argument("--dataset", default=None,
                   help="retrieval: Karpathy .json, .jsonl or a toy-world name (short, long, de, val_long, ...); "
                        "zeroshot: a folder with one subfolder per class, or a toy-world split (val, test)")
    p.add_argument("--toy-dir", default="toyworld", help="the toy world, used when no --dataset is given")
    p.add_argument("--images", default=None, help="retrieval: image root (default: the dataset file's folder)")
    p.add_argument("--split", default="test", help="Karpathy JSON: the split to evaluate")
    p.add_argument("--language", default=None, help=".jsonl: the caption language to evaluate (multilingual sets)")
    p.add_argument("--classnames", default=None, help="zeroshot: one display name per line, in sorted folder order")
    p.add_argument("--templates", default=None, help="zeroshot: JSON list of strings with {c} (default: OpenAI's 80)")
    p.add_argument("--heldout-classes", default=None, help="zeroshot: class names (one per line) held out of "
                                                          "training: adds acc1_seen and acc1_heldout")
    p.add_argument("--ks", default="1,5,10", help="retrieval: recall@K for these K (each at most the gallery size)")
    # the benchmark suite (miniproclip/benchmarks): --benchmark proclip, or --dataset NAME, under --data-root
    p.add_argument("--benchmark", choices=("proclip",), default=None, help="every benchmark of ProCLIP's Tables 1-2 "
                   "and XM3600 found under --data-root; writes benchmark.json and benchmark.md")
    for flag, help_text in SUITE_FLAGS.items():  # each a path or name, default None
        p.add_argument(flag, default=None, help=help_text)
    p.add_argument("--coco-five-captions", action="store_true", help="suite: COCO's first five captions per image "
                   "(Long-CLIP), not all")
    p.add_argument("--all-captions", action="store_true", help="suite: XM3600 with every caption per image")
    # output
    p.add_argument("--output", default=None, help="results JSON (default with --model: a file in the run folder)")
    p.add_argument("--show", type=int, default=0, metavar="K", help="retrieval: PNG of K queries and their top 5")
    # speed
    p.add_argument("--batch-size", type=int, default=64, help="images / texts per forward pass")
    p.add_argument("--workers", type=int, default=2, help="image loading processes (0: in-process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast dtype (default: amp_bf16 on CUDA and on CPUs with bf16 instructions, "
                   "else fp32)")
    args = p.parse_args(argv)
    if args.task is None and args.data_root is None:
        p.error("--task is required (or --benchmark proclip --data-root ROOT)")
    args.precision = args.precision or default_precision(args.device)
    return args


def newest_run(runs_dir: str) -> str:
    """The run folder under `runs_dir` whose `latest` file changed last (the newest checkpoint of all runs)."""
    runs = []
    if os.path.isdir(runs_dir):
        runs = [entry.path for entry in os.scandir(runs_dir) if os.path.isfile(os.path.join(entry.path, LATEST))]
    if not runs:
        raise evaluation.BenchmarkError(f"no run with a '{LATEST}' checkpoint under {runs_dir}/; train one with "
                                   f"`python train.py --stage 1`, or pass --model CKPT or --clip DIR")
    return max(runs, key=lambda run: os.path.getmtime(os.path.join(run, LATEST)))


def toy_path(args, *parts) -> str:
    path = os.path.join(args.toy_dir, *parts)
    if not os.path.exists(path):
        given = f"--dataset {args.dataset} is neither a file nor a toy-world name: " if args.dataset else ""
        raise evaluation.BenchmarkError(f"{given}{path} not found; build the toy world with `python train.py "
                                        f"--stage 1`, or pass --dataset (and --toy-dir if the toy world lives "
                                        f"elsewhere)")
    return path


def fill_defaults(args):
    """The newest run when no model is named; the toy world's test split when no dataset is named."""
    if args.clip and args.model:
        raise evaluation.BenchmarkError("pass either --clip (the baseline) or --model (a ProCLIP checkpoint), not both")
    if not (args.clip or args.model):
        args.model = newest_run(args.runs)
    if args.task == "retrieval":
        if args.dataset is None:
            args.dataset = toy_path(args, "retrieval_short.jsonl")
        elif not os.path.exists(args.dataset) and re.fullmatch(r"[\w-]+", args.dataset):  # toy shorthand: long, de
            args.dataset = toy_path(args, f"retrieval_{args.dataset}.jsonl")
    elif args.dataset is None or args.dataset in ("val", "test") and not os.path.isdir(args.dataset):  # toy split
        args.dataset = toy_path(args, "zeroshot", args.dataset or "test")
        args.classnames = args.classnames or toy_path(args, "zeroshot", "classnames.txt")
        args.templates = args.templates or toy_path(args, "zeroshot", "templates.json")
        heldout = os.path.join(args.toy_dir, "zeroshot", "heldout_classes.txt")  # optional in a toy world
        args.heldout_classes = args.heldout_classes or (heldout if os.path.exists(heldout) else None)
    if args.model and is_released(args.model):  # LLM2CLIP/ProCLIP weights: no run folder, no training cache
        args.text_cache = args.text_cache or text_cache_path(os.path.dirname(os.path.abspath(args.dataset)),
                                                             os.path.basename(os.path.normpath(args.llm or "llm")))
    elif args.model:
        if os.path.isfile(os.path.join(args.model, EXPORT_JSON)):  # an exported folder (python -m miniproclip.export)
            args.model = folder = os.path.normpath(args.model)
            step = "export"
            # it has no training cache: its texts are cached inside it
            args.text_cache = args.text_cache or text_cache_path(args.model)
        else:
            args.model = resolve_checkpoint(args.model)
            folder, step = os.path.dirname(args.model), os.path.basename(args.model).removesuffix(".safetensors")
        if args.output is None:  # results go beside the checkpoint (or into the exported folder) they belong to
            name = os.path.splitext(os.path.basename(os.path.normpath(args.dataset)))[0]
            name += f"_{args.language}" if args.language else ""
            args.output = os.path.join(folder, f"eval_{args.task}_{name}_{step}.json")
    try:
        args.ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        raise evaluation.BenchmarkError(f"--ks {args.ks!r}: give comma-separated integers such as 1,5,10") from None
    if args.output:  # fail now rather than after encoding the whole set
        folder = os.path.dirname(os.path.abspath(args.output))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise evaluation.BenchmarkError(f"--output {args.output}: cannot create {folder} "
                                            f"({err.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise evaluation.BenchmarkError(f"--output {args.output}: {folder} is not writable; choose another path")


def evaluate(args):
    """Load the model and the data, run the task; returns (report, retrieval gallery or None)."""
    if args.model:
        encoders = evaluation.proclip_encoders(args.model, args.text_cache, args.device, args.precision, llm=args.llm)
    else:
        encoders = evaluation.clip_encoders(args.clip, args.device, args.precision)
    if args.task == "retrieval":
        dataset = evaluation.read_retrieval_set(args.dataset, args.images, args.split, args.language)
        print(f"retrieval: {len(dataset.images)} images, {len(dataset.texts)} captions from {args.dataset}, "
              f"{describe(args.precision, args.device)}")
        report, gallery = evaluation.run_retrieval(encoders, dataset, args.batch_size, args.workers, args.device,
                                                   args.ks)
    else:
        dataset = evaluation.read_image_folder(args.dataset, args.classnames)
        try:
            templates = load_templates(args.templates)
        except (OSError, ValueError) as err:  # metrics.py stands alone: its errors are the plain types
            raise evaluation.BenchmarkError(str(err)) from None
        print(f"zeroshot: {len(dataset.images)} images of {len(dataset.classnames)} classes from {args.dataset}, "
              f"{len(templates)} templates, {describe(args.precision, args.device)}")
        heldout = evaluation.read_lines(args.heldout_classes) if args.heldout_classes else None
        report = evaluation.run_zeroshot(encoders, dataset, templates, args.batch_size, args.workers, args.device,
                                         heldout)
        gallery = None
    report = {"task": args.task, "dataset": args.dataset, "model": encoders.name, **report}
    if args.language:
        report["language"] = args.language
    # acc5 with fewer than 5 classes is nan, which JSON cannot hold: null
    report["metrics"] = {name: None if value != value else value for name, value in report["metrics"].items()}
    return report, gallery, encoders.clip_dir


def print_report(report):
    print(f"\n{report['task']} on {report['dataset']} with {report['model']}")
    print(f"{report['n_images']} images, {report['n_texts']} texts, {report['truncated_captions']} truncated")
    for name, value in report["metrics"].items():
        print(f"  {name:<28} " + ("   n/a" if value is None else f"{100 * value:6.2f}"))
    skipped = report["skipped_images"]
    if skipped:
        more = f" (+{len(skipped) - 5} more, all listed in the output JSON)" if len(skipped) > 5 else ""
        print(f"warning: skipped {len(skipped)} unreadable images: {', '.join(skipped[:5])}{more}")


def next_step(args, clip_dir):
    """A hint at what to run next: the CLIP baseline on the same data, or a ProCLIP run after the baseline."""
    data = [("--dataset", args.dataset), ("--images", args.images), ("--language", args.language),
            ("--classnames", args.classnames), ("--templates", args.templates)]
    same_data = " ".join(f"{flag} {shlex.quote(value)}" for flag, value in data if value)
    if args.model and is_released(args.model):  # its CLIP folder is not known: the one it was tuned from
        return f"compare with its CLIP baseline: python eval.py --task {args.task} --clip CLIP_DIR {same_data}"
    if args.model:
        return f"compare with the CLIP baseline: python eval.py --task {args.task} --clip {clip_dir} {same_data}"
    return f"evaluate a ProCLIP run on the same data: python eval.py --task {args.task} --model RUN {same_data}"


def main(argv=None):
    args = parse_args(argv)
    if args.data_root is not None:
        return run_benchmarks(args)
    try:
        fill_defaults(args)
        report, gallery, clip_dir = evaluate(args)
    except UserError as err:
        exit_with(err)
    print_report(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"results written to {args.output}")
    if args.show and gallery is not None:
        png = os.path.splitext(args.output)[0] + ".png" if args.output else f"eval_{args.task}_examples.png"
        evaluation.show_grid(png, gallery, args.show)
        print(f"{args.show} example queries with their top-5 images (the right one framed green): {png}")
    print(f"next: {next_step(args, clip_dir)}")
    return report


def run_benchmarks(args):
    """--data-root: the suite (or the one --dataset NAME) through miniproclip.benchmarks.suite; prints the tables."""
    try:
        if args.clip and args.model:
            raise evaluation.BenchmarkError("pass either --clip (the baseline) or --model, not both")
        model = args.model or (None if args.clip else newest_run(args.runs))
        if model:
            encoders = evaluation.proclip_encoders(model, None, args.device, args.precision, llm=args.llm)
        else:
            encoders = evaluation.clip_encoders(args.clip, args.device, args.precision)
        options = suite.reader_options(args.coco_five_captions, args.dci_split, args.all_captions, args.language)
        try:
            ks = tuple(int(k) for k in args.ks.split(","))
        except ValueError:
            raise evaluation.BenchmarkError(f"--ks {args.ks!r}: give comma-separated integers such as 1,5,10") from None
        results = suite.run_suite(encoders, args.data_root, cache_dir=args.cache_dir, options=options,
                                  names=[args.dataset] if args.dataset else None, batch_size=args.batch_size,
                                  workers=args.workers, device=args.device, ks=ks)
        out_dir = args.output or (model if model and os.path.isdir(model) else args.data_root)
        markdown = suite.write_tables(results, out_dir, args.paper_rows or suite.infer_backbone(encoders.clip_dir))
    except UserError as err:
        exit_with(err)
    print(markdown)
    print(f"tables written to {os.path.join(out_dir, 'benchmark.md')} and benchmark.json")
    return results
