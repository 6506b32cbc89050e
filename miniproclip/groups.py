"""Stage 0's data: groups of texts that mean the same thing (a caption, its long version, its translations), their
training pairs, and the held-out measures of an embedder on them.

LLM2CLIP's caption-contrastive fine-tune (arXiv 2411.04997, sec. 3) treats the texts of one group as positives
and the other groups' texts in the batch as negatives. A group's first text is its anchor (e.g. a short caption);
each training step pairs it with one of the group's other texts (`pick_pairs`), as LLM2Vec pairs a query with a
positive of the other kind.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import MAX_WARNINGS, DataError, MalformedRow, RowSkipper, clean_text, expand_braces, jsonl_records, \
    read_rows


def _group(record: dict) -> tuple[list[str], list[str] | None]:
    """The texts of one JSONL record, and their kinds when the record names them: {"texts": [...]} with an
    optional {"kinds": [...]} (e.g. ["short", "long", "de"]), or an image-caption row's caption and long caption."""
    if "texts" in record:
        if not isinstance(record["texts"], list):
            raise MalformedRow(f'"texts" must be a list, got {type(record["texts"]).__name__}')
        texts = [clean_text(t, "texts", required=True) for t in record["texts"]]
    else:  # an image-caption row: the caption and its long version
        texts = [clean_text(record.get(k), k, required=True) for k in ("caption", "long_caption")]
    kinds = record.get("kinds")
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != len(texts)):
        raise MalformedRow('"kinds" must be a list with one kind per text')
    if len(set(texts)) < len(texts):  # a repeated text is no second view
        keep = [texts.index(t) for t in dict.fromkeys(texts)]
        texts, kinds = [texts[i] for i in keep], kinds and [kinds[i] for i in keep]
    if len(texts) < 2:
        raise MalformedRow("a group needs two different texts")
    return texts, kinds


@dataclass
class Groups:
    """Stage 0's data: groups of texts that mean the same thing, the first text of each its anchor."""
    texts: list[list[str]]
    sources: list[int]  # the file each group came from: a training batch holds one file's groups
    kinds: list[list[str]] | None  # each text's kind where every row names them (validation groups), else None

    def __len__(self) -> int:
        return len(self.texts)


def read_groups(source: str, strict: bool = False, log=print) -> Groups:
    """Every group of `source` (paths joined by "::", brace patterns allowed). A .jsonl file holds rows
    {"texts": [...]} (optionally with "kinds") or image-caption rows {"caption", "long_caption"}; .csv/.tsv/.tar
    image-caption sources are read by `data.read_rows` and give a group per row with a long caption. Malformed
    rows are skipped with a count (or raise DataError when `strict`), as in stages 1-2."""
    skip, groups, sources, kinds = RowSkipper(strict, log), [], [], []
    for part in source.split("::"):
        for path in expand_braces(part):
            if not os.path.isfile(path):
                raise DataError(f"{path} does not exist: check the data path {source!r}")
            skipped_before = skip.count
            if path.lower().endswith(".jsonl"):
                file_groups = list(jsonl_records(path, skip, _group))
            else:
                rows = read_rows(path, strict=strict, log=log)
                file_groups = [([r.caption, r.long_caption], None) for r in rows if r.long_caption]
                if len(file_groups) < len(rows):
                    log(f"warning: {path}: {len(rows) - len(file_groups)} rows without a long caption skipped "
                        "(a group needs two texts)")
            if not file_groups:
                raise DataError(f"{path}: no valid groups ({skip.count - skipped_before} malformed skipped): "
                                'expected JSONL rows {"texts": [...]} or rows with caption and long_caption')
            sources += [len(set(sources))] * len(file_groups)
            groups += [texts for texts, _ in file_groups]
            kinds += [group_kinds for _, group_kinds in file_groups]
    if skip.count:
        shown = f", the first {MAX_WARNINGS} shown above" if skip.count > MAX_WARNINGS else ""
        log(f"warning: skipped {skip.count} malformed rows in {source}{shown}")
    return Groups(groups, sources, kinds if all(k is not None for k in kinds) else None)


def pick_pairs(groups: list[list[str]], indices: list[int], seed: int, epoch: int) -> list[tuple[str, str]]:
    """(anchor, positive) of each group `indices[i]`: its first text and one of the others, drawn by a generator
    keyed by (seed, epoch, group index), so the draw does not depend on the batch or the rank layout.

    LLM2CLIP/LLM2Vec pair a query with a positive of the other kind (a short caption with its long version or a
    translation). Pairs of any two texts of a group collapse on the toy world: two translations of one scene are
    no closer to each other in raw SmolLM2 than to other scenes' texts of their languages, and making every
    embedding equal is the loss's fastest way down, where every gradient vanishes (RESULTS.md, "Stage 0")."""
    pairs = []
    for index in indices:
        group = groups[index]
        positive = 1 + int(np.random.default_rng([seed, epoch, index]).integers(len(group) - 1))
        pairs.append((group[0], group[positive]))
    return pairs


def anchor_recall(embed, groups: list[list[str]], kinds: list[list[str]] | None = None) -> dict[str, float]:
    """Held-out groups: for every text after a group's first (its anchor), is its own anchor the most cosine-
    similar of all the groups' anchors? The share, per kind of text (`kinds[g][i]` names text i of group g, e.g.
    "long", "de"; default: its position in the group). `embed(texts)` -> (N, C) embeddings."""
    anchors = F.normalize(embed([g[0] for g in groups]).float(), dim=-1)  # (G, C)
    queries = [(g, kinds[g][i] if kinds else str(i)) for g, group in enumerate(groups) for i in range(1, len(group))]
    texts = [groups[g][i] for g, group in enumerate(groups) for i in range(1, len(group))]
    nearest = (F.normalize(embed(texts).float(), dim=-1) @ anchors.T).argmax(1).tolist()  # (Q,) anchor index
    hits = {}
    for (g, kind), found in zip(queries, nearest):
        hits.setdefault(kind, []).append(found == g)
    return {kind: sum(found) / len(found) for kind, found in hits.items()}


def nearest_neighbour_accuracy(embeddings: torch.Tensor, group_ids: list[int]) -> float:
    """Share of texts whose most cosine-similar other text belongs to the same group (held-out paraphrases)."""
    x = F.normalize(embeddings.float(), dim=-1)
    similarity = (x @ x.T).fill_diagonal_(-float("inf"))  # (N, N), a text is not its own neighbour
    groups = torch.tensor(group_ids)
    return (groups[similarity.argmax(1)] == groups).float().mean().item()
