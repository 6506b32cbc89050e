"""The whole ProCLIP benchmark suite in one call: every dataset found under a root, scored, tabled as the paper does.

`run_suite` finds each benchmark's folder under ROOT by name (case-insensitive, '-' and '_' ignored), reads it with
the released-layout readers (retrieval.py's RETRIEVAL_READERS, classification.py's CLASSIFICATION_READERS), scores
it with evaluation.py's run_retrieval / run_zeroshot (CLIP_benchmark's metrics, metrics.py) and lists the missing
ones. `write_tables` writes benchmark.json and benchmark.md in the paper's column order: Table 1 (retrieval R@1
I2T / T2I), Table 2 (zero-shot acc1), XM3600 per language, each beside the paper's published rows for the same
backbone (assets/proclip_paper_tables.json, from VisionXLab/ProCLIP's assets/retrieval.png and
classification.png). Averages are over the datasets present; the paper's are shown as printed.
"""

import json
import os
import re
from pathlib import Path

from tqdm import tqdm

from ..embed import text_cache_path
from ..errors import BenchmarkError
from . import classification, retrieval

PAPER_TABLES = Path(__file__).resolve().parent.parent / "assets" / "proclip_paper_tables.json"
# (reader name, column title) in the paper's order: Table 1, then Table 2
TABLE1 = [("flickr30k", "Flickr30k"), ("coco", "COCO"), ("sharegpt4v-1k", "ShareGPT4V-1k"), ("urban1k", "Urban-1k"),
          ("docci", "DOCCI"), ("dci", "DCI")]
TABLE2 = [("food101", "Food101"), ("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100"), ("sun397", "SUN397"),
          ("cars", "Cars"), ("fgvc_aircraft", "Aircraft"), ("dtd", "DTD"), ("pets", "Pets"),
          ("caltech101", "Caltech101"), ("flowers", "Flowers"), ("imagenet1k", "ImageNet")]
XM3600 = "xm3600"


def default_registries():
    """(retrieval readers, classification readers, templates(name), XM3600 languages): the released-layout readers
    (a test passes stand-ins through run_suite's `registries`)."""
    return (retrieval.RETRIEVAL_READERS, classification.CLASSIFICATION_READERS, classification.templates,
            retrieval.XM3600_LANGUAGES)


def _key(name: str) -> str:
    return re.sub(r"[-_]", "", name.lower())


def discover(root: str, names) -> dict[str, str]:
    """{name: ROOT/<folder>} for each name with a folder under root spelled alike (case, '-' and '_' ignored)."""
    if not os.path.isdir(root):
        raise BenchmarkError(f"data_root (--data-root) {root} is not a folder; pass the folder holding flickr30k/, "
                             "coco/, ...")
    folders = {_key(entry.name): entry.path for entry in os.scandir(root) if entry.is_dir()}
    return {name: folders[_key(name)] for name in names if _key(name) in folders}


def reader_options(coco_five_captions=False, dci_split=None, all_captions=False, language=None) -> dict:
    """The readers' keyword arguments for the conventions papers disagree on; only those set (else the readers'
    defaults: COCO all captions, DCI all splits, XM3600 every language with one caption per image)."""
    options = {"coco": {"five_captions": True} if coco_five_captions else {},
               "dci": {"split": dci_split} if dci_split else {},
               XM3600: {**({"all_captions": True} if all_captions else {}), **({"language": language} if language
                                                                               else {})}}
    return {name: chosen for name, chosen in options.items() if chosen}


def read_all(found: dict[str, str], retrieval_readers, classification_readers, options, languages) -> dict:
    """{name (xm3600/<lang> per language): (kind, dataset)}; a present but unreadable folder fails here, naming it,
    before anything is encoded."""
    datasets = {}
    for name, folder in found.items():
        try:
            if name == XM3600:
                chosen = [options[XM3600]["language"]] if options.get(XM3600, {}).get("language") else languages
                rest = {k: v for k, v in options.get(XM3600, {}).items() if k != "language"}
                for language in chosen:
                    reader = retrieval_readers[XM3600]
                    datasets[f"{XM3600}/{language}"] = ("retrieval", reader(folder, language=language, **rest))
            elif name in retrieval_readers:
                datasets[name] = ("retrieval", retrieval_readers[name](folder, **options.get(name, {})))
            else:
                datasets[name] = ("classification", classification_readers[name](folder, **options.get(name, {})))
        except BenchmarkError as err:
            raise BenchmarkError(f"{name} ({folder}) is present but cannot be read: {err}") from None
    return datasets


class SharedImages:
    """XM3600's 36 languages share one gallery: its images are encoded once (on first use), each language's
    gallery is then a selection of those rows."""

    def __init__(self, datasets, encode):
        self.paths = list(dict.fromkeys(path for dataset in datasets for path in dataset.images))
        self.encode, self.encoded = encode, None

    def of(self, dataset):
        """encode_images' (features, readable indices, unreadable paths) for dataset.images."""
        if self.encoded is None:
            features, readable, unreadable = self.encode(self.paths)
            self.encoded = {self.paths[i]: row for row, i in enumerate(readable)}, features, set(unreadable)
        row_of, features, unreadable = self.encoded
        readable = [i for i, path in enumerate(dataset.images) if path in row_of]
        rows = [row_of[dataset.images[i]] for i in readable]
        return features[rows], readable, [path for path in dataset.images if path in unreadable]


def run_suite(encoders, root: str, *, cache_dir: str | None = None, names=None, options=None, batch_size=64,
              workers=2, device="cpu", ks=(1, 5, 10), registries=None, log=print) -> dict:
    """Score every benchmark found under `root` (or only `names`); returns the benchmark.json dictionary.

    encoders: evaluation.Encoders; with a text cache (ProCLIP), each benchmark's texts go to their own cache file
    under cache_dir (default ROOT/.cache), reused on the next run. options: {name: reader keyword arguments}.
    """
    from .. import evaluation  # evaluation imports this package: import it when run
    retrieval_readers, classification_readers, templates, languages = registries or default_registries()
    known = [n for n, _ in TABLE1] + [n for n, _ in TABLE2] + [XM3600]
    by_key = {_key(name): name for name in known}
    wanted = [by_key.get(_key(n), n) for n in names] if names else known  # --dataset URBAN-1K: urban1k
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise BenchmarkError(f"benchmark name (--dataset) {unknown[0]!r} is not a benchmark of the suite; pass one of "
                             f"{', '.join(known)}")
    readable = [n for n in wanted if n in retrieval_readers or n in classification_readers]
    found = discover(root, readable)
    if names and len(found) < len(wanted):
        lost = [n for n in wanted if n not in found][0]
        raise BenchmarkError(f"no folder {lost}/ under {root} (or no reader for it in this checkout); "
                             f"lay the dataset out there as the README's Benchmarks section says")
    datasets = read_all(found, retrieval_readers, classification_readers, options or {}, languages)
    cache_dir = cache_dir or os.path.join(root, ".cache")
    results = {"model": encoders.name, "data_root": root, "retrieval": {}, "classification": {},
               "missing": [n for n in wanted if n not in found],
               "no_reader": [n for n in wanted if n not in readable]}
    xm3600 = [dataset for name, (_, dataset) in datasets.items() if name.startswith(XM3600 + "/")]
    shared = SharedImages(xm3600, lambda paths: evaluation.encode_images(encoders, paths, batch_size, workers, device))
    for name, (kind, dataset) in tqdm(datasets.items(), desc="benchmarks", unit="set", dynamic_ncols=True):
        if encoders.use_text_cache is not None:
            os.makedirs(cache_dir, exist_ok=True)
            encoders.use_text_cache(text_cache_path(cache_dir, f"{name}_{encoders.text_tag}"))
        log(f"{name}: {len(dataset.images)} images")
        if kind == "retrieval":
            images = shared.of(dataset) if name.startswith(XM3600 + "/") else None
            report, _ = evaluation.run_retrieval(encoders, dataset, batch_size, workers, device, ks, images)
            results["retrieval"][name] = report
        else:
            report = evaluation.run_zeroshot(encoders, dataset, templates(name), batch_size, workers, device)
            results["classification"][name] = report
        # acc5 with fewer than 5 classes is nan, which JSON cannot hold: null (as eval.py)
        report["metrics"] = {key: None if value != value else value for key, value in report["metrics"].items()}
    results["skipped_images"] = {name: len(report["skipped_images"]) for section in ("retrieval", "classification")
                                 for name, report in results[section].items() if report["skipped_images"]}
    return results


# ----------------------------------------------------------------------------- tables

def load_paper_rows(backbone: str | None) -> dict:
    """The paper's rows for a backbone key of assets/proclip_paper_tables.json (e.g. "B/16-3M"); {} for None."""
    tables = json.loads(PAPER_TABLES.read_text())
    if backbone is None:
        return {}
    if backbone not in tables:
        keys = ", ".join(k for k in tables if not k.startswith("_"))
        raise BenchmarkError(f"paper_rows (--paper-rows) {backbone!r} is not in {PAPER_TABLES}; pass one of: {keys}")
    return tables[backbone]


def infer_backbone(clip_dir: str) -> str | None:
    """"B/16-3M" for a ViT-B/16 CLIP folder (the only B/16 data size with published tables); otherwise None
    (L/14 has 3M and 30M rows: pass --paper-rows)."""
    try:
        with open(os.path.join(clip_dir, "config.json"), encoding="utf-8") as f:
            vision = json.load(f)["vision_config"]
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return "B/16-3M" if (vision.get("hidden_size"), vision.get("patch_size")) == (768, 16) else None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summary(results: dict) -> dict:
    """Table 1 ({name: [I2T, T2I] R@1}), Table 2 ({name: acc1}), XM3600 ({language: [I2T, T2I]}), in percent,
    with averages over the datasets present."""
    def r_at_1(report):
        metrics = report["metrics"]
        return [100 * metrics["text_retrieval_recall@1"], 100 * metrics["image_retrieval_recall@1"]]
    retrieval = results["retrieval"]
    table1 = {name: r_at_1(retrieval[name]) for name, _ in TABLE1 if name in retrieval}
    table2 = {name: 100 * results["classification"][name]["metrics"]["acc1"] for name, _ in TABLE2
              if name in results["classification"]}
    xm = {name.split("/")[1]: r_at_1(report) for name, report in retrieval.items() if name.startswith(XM3600 + "/")}
    average = lambda rows: [_mean(r[0] for r in rows), _mean(r[1] for r in rows)] if rows else None  # noqa: E731
    table1["average"] = average(list(table1.values()))
    table2["average"] = _mean(table2.values())
    xm["mean"] = average(list(xm.values()))
    return {"table1": table1, "table2": table2, "xm3600": xm}


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return "/".join("–" if v is None else f"{v:.1f}" for v in value)
    return f"{value:.1f}"


def _table(title, columns, ours, paper, note) -> list[str]:
    lines = [f"## {title}", "", "| model | " + " | ".join(t for _, t in columns) + " |",
             "|---" * (len(columns) + 1) + "|",
             "| this model | " + " | ".join(_cell(ours.get(n)) for n, _ in columns) + " |"]
    for model, row in paper.items():
        lines.append(f"| paper: {model} | " + " | ".join(_cell(row.get(n)) for n, _ in columns) + " |")
    return lines + ["", note, ""]


def write_tables(results: dict, out_dir: str, backbone: str | None) -> str:
    """benchmark.json (every report, the summary, the paper rows; added to `results`) and benchmark.md; returns
    the markdown."""
    paper, tables = load_paper_rows(backbone), summary(results)
    results.update(summary=tables, paper_rows=backbone)
    present = lambda table, names: [t for n, t in names if n in table]  # noqa: E731
    avg = ("average: over the datasets present here ({}); the paper's averages are as printed, over all of them. "
           "Rows absent from the paper for this backbone show –.")
    lines = [f"# Benchmarks of {results['model']}", "",
             f"Data root {results['data_root']}; missing: {', '.join(results['missing']) or 'none'}; "
             f"paper rows: {backbone or 'none (pass --paper-rows)'}. Percent.", ""]
    lines += _table("Table 1: zero-shot retrieval R@1, I2T / T2I", TABLE1 + [("average", "average")],
                    tables["table1"], paper.get("table1", {}), avg.format(", ".join(present(tables["table1"], TABLE1))))
    lines += _table("Table 2: zero-shot classification acc1", TABLE2 + [("average", "average")],
                    tables["table2"], paper.get("table2", {}), avg.format(", ".join(present(tables["table2"], TABLE2))))
    languages = [(code, code) for code in tables["xm3600"] if code != "mean"] + [("mean", "mean")]
    lines += _table("XM3600 retrieval R@1, I2T / T2I, per language", languages, tables["xm3600"],
                    paper.get("xm3600", {}), "mean: over the languages evaluated here.")
    markdown = "\n".join(lines)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "benchmark.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "benchmark.md"), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    return markdown
