"""Image-caption data: reading JSONL / CSV / webdataset-tar sources into rows (loader.py batches them).

Mirrors the inputs of mlfoundations/open_clip `src/open_clip_train/data.py`: `--csv-img-key` (default "filepath"),
`--csv-caption-key` ("title"), `--csv-separator`, and webdataset shard lists with brace expansion, several joined
with "::"; a tar sample is the members sharing a key (`KEY.jpg` + `KEY.txt` or `KEY.json`), split as webdataset's
`base_plus_ext` does. Where it differs from open_clip:
- tar shards are indexed once up front (captions read, image byte offsets recorded) and images are read later by
  seek, so every source is map-style. One seeded permutation per epoch, cut into global batches (`loader.epoch_batches`),
  makes a mid-epoch resume exact and a W-rank run see the same samples as a 1-rank run with a W times larger batch;
  open_clip streams shards and can do neither.
- relative image paths resolve against the data file's folder (open_clip: against the working directory), and the
  CSV separator follows the extension unless given ("," for .csv, tab for .tsv; open_clip: always tab).
- unreadable images are dropped in `loader.collate` and reported, where open_clip logs and skips them in the pipeline.
Rows carry the short caption and an optional long caption: the ProCLIP loader pairs each image with both.
"""

import csv
import json
import os
import re
import tarfile
import zipfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .files import atomic_path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # tar members that hold a sample's image, in order of preference
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: KEY (no dots).EXTENSION
MAX_WARNINGS = 10  # malformed rows warned about one by one per read_rows call; the rest are only counted
INDEX_SUFFIX, INDEX_VERSION = ".index.npz", 1  # the sidecar next to each tar shard, and its format
TAR_PREFIX = "tar://"  # Row.image of a shard's sample: "tar://<tar path>#<member>"


class DataError(UserError, ValueError):
    """A data source that cannot be used: missing file, wrong columns, no valid rows, a bad row with strict=True."""


class MalformedRow(Exception):
    """One bad row or sample; the reader turns it into a warning, or a DataError when strict."""


@dataclass(slots=True)
class Row:
    image: str  # absolute path, or "tar://<tar path>#<member>" for an image inside a shard
    caption: str
    long_caption: str | None = None
    tar_member: tuple[str, int, int] | None = None  # (tar path, byte offset, byte size) of a shard's image


class Rows:
    """Rows stored compactly: every string of every row in one UTF-8 byte buffer, plus numpy offsets, so a row
    costs its text bytes + 24 bytes (+ 20 where any row is a tar sample) instead of ~665 bytes of Python objects, and
    DataLoader workers forked from the trainer share these few arrays instead of copying objects they touch.

    `rows[i]` is a `Row`; `len`, iteration and `+` (another Rows or a list of Row) work as on a list.
    """

    def __init__(self, text: np.ndarray, ends: np.ndarray, shards: list[str], shard_ids: np.ndarray,
                 members: np.ndarray):
        self.text = text  # (bytes,) uint8: image, caption, long caption of row 0, then of row 1, ...
        self.ends = ends  # (N, 3) int64: where each row's image, caption and long caption end in `text`
        self.shards = shards  # tar paths that the rows' samples come from
        self.shard_ids = shard_ids  # (N,) int32: index into `shards`, -1 for an image file; (0,) without shards
        self.members = members  # (N, 2) int64: (byte offset, byte size) of a tar sample's image; (0, 2) without

    @classmethod
    def from_rows(cls, rows: Iterable[Row]) -> "Rows":
        """Pack Rows one at a time (a reader's generator): memory grows by the packed size only."""
        text, ends, shard_ids, members, shards = bytearray(), array("q"), array("i"), array("q"), {}
        for row in rows:
            image = row.image
            if row.tar_member is not None:  # keep only the member name; the shard path is stored once
                tar_path, offset, size = row.tar_member
                image = image[len(TAR_PREFIX) + len(tar_path) + 1:]
                shard_ids.append(shards.setdefault(tar_path, len(shards)))
                members.extend((offset, size))
            else:
                shard_ids.append(-1)
                members.extend((0, 0))
            for field in (image, row.caption, row.long_caption or ""):  # no long caption: an empty field
                text += field.encode("utf-8")
                ends.append(len(text))
        if not shards:  # image files only: no per-row shard arrays at all
            shard_ids, members = array("i"), array("q")
        return cls(np.frombuffer(text, np.uint8), np.frombuffer(ends, np.int64).reshape(-1, 3), list(shards),
                   np.frombuffer(shard_ids, np.int32), np.frombuffer(members, np.int64).reshape(-1, 2))

    @classmethod
    def concat(cls, parts: list["Rows"]) -> "Rows":
        """One Rows holding `parts` (Rows or lists of Row) one after the other."""
        parts = [part if isinstance(part, Rows) else cls.from_rows(part) for part in parts] or [cls.from_rows([])]
        shifts = np.cumsum([0] + [len(part.text) for part in parts])  # where each part's text starts
        firsts = np.cumsum([0] + [len(part.shards) for part in parts])  # where each part's shard list starts
        with_tar = firsts[-1] > 0
        return cls(np.concatenate([part.text for part in parts]),
                   np.concatenate([part.ends + shift for part, shift in zip(parts, shifts)]),
                   [shard for part in parts for shard in part.shards],
                   np.concatenate([part.shard_ids + first if len(part.shard_ids) else np.full(len(part), -1, np.int32)
                                   for part, first in zip(parts, firsts)]).astype(np.int32) if with_tar else
                   np.zeros(0, np.int32),
                   np.concatenate([part.members if len(part.members) else np.zeros((len(part), 2), np.int64)
                                   for part in parts]) if with_tar else np.zeros((0, 2), np.int64))

    def __len__(self) -> int:
        return len(self.ends)

    def __add__(self, other) -> "Rows":
        return Rows.concat([self, other])

    def __iter__(self) -> Iterator[Row]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> Row:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        index %= len(self)
        start = self.ends[index - 1, 2] if index else 0
        image, caption, long_caption = (self.text[a:b].tobytes().decode("utf-8")
                                        for a, b in zip((start, *self.ends[index, :2]), self.ends[index]))
        shard = self.shard_ids[index] if len(self.shard_ids) else -1
        if shard < 0:
            return Row(image, caption, long_caption or None)
        tar_path, (offset, size) = self.shards[shard], self.members[index].tolist()
        return Row(f"{TAR_PREFIX}{tar_path}#{image}", caption, long_caption or None, (tar_path, offset, size))



def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: "s-{08..10}.tar" -> s-08, s-09, s-10 (zero padding kept); "{a,b}" -> a, b."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    # find the matching "}" and the commas at the top level of this group
    depth, commas = 0, []
    for end in range(start, len(pattern)):
        depth += (pattern[end] == "{") - (pattern[end] == "}")
        if pattern[end] == "," and depth == 1:
            commas.append(end)
        if depth == 0:
            break
    else:
        raise DataError(f"{pattern}: unbalanced '{{' in the data path")
    body = pattern[start + 1 : end]
    number_range = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if number_range:
        first, last = number_range.groups()
        padded = any(len(bound) > 1 and bound[0] == "0" for bound in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif commas:
        bounds = [start, *commas, end]
        options = [pattern[a + 1 : b] for a, b in zip(bounds, bounds[1:])]
    else:
        raise DataError(f"{pattern}: cannot expand {{{body}}}: write {{a,b}} or a range like {{000..009}}")
    # options may hold nested groups and the tail more groups: expand the rest recursively
    return [path for option in options for path in expand_braces(pattern[:start] + option + pattern[end + 1 :])]


class RowSkipper:
    """Malformed rows: raise at the first one when strict, else warn about the first few and count them all."""

    def __init__(self, strict: bool, log):
        self.strict, self.log, self.count = strict, log, 0

    def __call__(self, where: str, what: str):
        if self.strict:
            raise DataError(f"{where}: {what}")
        self.count += 1
        if self.count <= MAX_WARNINGS:
            self.log(f"warning: skipping {where}: {what}")


def clean_text(value, key: str, required: bool) -> str | None:
    """`value` stripped of surrounding whitespace; an optional field that is absent, null or blank gives None."""
    if value is None:
        if required:
            raise MalformedRow(f'missing "{key}"')
        return None
    if not isinstance(value, str):
        raise MalformedRow(f'"{key}" must be a string, got {type(value).__name__}')
    if not value.strip():
        if required:
            raise MalformedRow(f'empty "{key}"')
        return None
    return value.strip()


def _file_row(record: dict, image_key: str, caption_key: str, folder: str) -> Row:
    """A Row from one JSONL/CSV record; a relative image path is taken from the data file's folder."""
    image = clean_text(record.get(image_key), image_key, required=True)
    return Row(image=os.path.normpath(os.path.join(folder, image)),
               caption=clean_text(record.get(caption_key), caption_key, required=True),
               long_caption=clean_text(record.get("long_caption"), "long_caption", required=False))


def json_lines(path: str) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) of each non-blank line of a JSONL file, the one JSONL reader of the project.
    A line that is not JSON (or not UTF-8) comes as (line number, its ValueError), for the caller to skip, count
    or raise with the file and line; the lines after it are still read."""
    with open(path, "rb") as f:  # bytes: json.loads decodes UTF-8 per line, so one bad line is one bad row
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield line_number, json.loads(line)
                except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
                    yield line_number, error


def jsonl_records(path: str, skip: RowSkipper, parse) -> Iterator:
    """`parse(record)` of each JSON-object line of `path`; a malformed line (bad JSON, not an object, or `parse`
    raising MalformedRow) goes to `skip` with its file:line."""
    for line_number, record in json_lines(path):
        try:
            if isinstance(record, ValueError):
                raise MalformedRow(f"invalid JSON ({record})")
            if not isinstance(record, dict):
                raise MalformedRow(f"expected a JSON object, got {type(record).__name__}")
            yield parse(record)
        except MalformedRow as error:
            skip(f"{path}:{line_number}", str(error))


def _read_jsonl(path: str, skip: RowSkipper) -> Iterator[Row]:
    folder = os.path.dirname(os.path.abspath(path))
    return jsonl_records(path, skip, lambda record: _file_row(record, "image", "caption", folder))


def _read_csv(path: str, image_key: str, caption_key: str, separator: str, skip: RowSkipper) -> Iterator[Row]:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: tolerate a byte-order mark
            reader = csv.DictReader(f, delimiter=separator)
            columns = reader.fieldnames or []
            for key, flag in ((image_key, "image_key (--csv-img-key)"),
                              (caption_key, "caption_key (--csv-caption-key)")):
                if key not in columns:
                    raise DataError(f"{path}: no column {key!r} (header: {columns}, separator {separator!r}): "
                                    f"set {flag} or separator (--csv-separator)")
            for record in reader:
                try:
                    # DictReader files surplus fields under None and fills missing ones with None
                    if None in record or None in record.values():
                        raise MalformedRow(f"expected {len(columns)} fields separated by {separator!r}")
                    row = _file_row(record, image_key, caption_key, folder)
                except MalformedRow as error:
                    skip(f"{path}:{reader.line_num}", str(error))
                    continue
                yield row
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot parse as UTF-8 CSV ({error}): fix the file") from error


def _tar_row(tar: tarfile.TarFile, path: str, key: str, members: dict[str, tarfile.TarInfo]) -> Row:
    """A Row from one tar sample: the image member, and the caption from KEY.txt or KEY.json (which may also
    hold "long_caption"); only the text members are read now, the image's offset is recorded for later."""
    image = next((members[extension] for extension in IMAGE_EXTENSIONS if extension in members), None)
    if image is None:
        raise MalformedRow(f"no image member ({key}.jpg/.jpeg/.png/.webp)")
    if "txt" not in members and "json" not in members:
        raise MalformedRow(f"no caption member ({key}.txt or {key}.json)")
    record = json.loads(tar.extractfile(members["json"]).read()) if "json" in members else {}
    if not isinstance(record, dict):
        raise MalformedRow(f"expected a JSON object, got {type(record).__name__}")
    if "txt" in members:
        record["caption"] = tar.extractfile(members["txt"]).read().decode("utf-8")
    return Row(image=f"{TAR_PREFIX}{path}#{image.name}",
               caption=clean_text(record.get("caption"), "caption", required=True),
               long_caption=clean_text(record.get("long_caption"), "long_caption", required=False),
               tar_member=(path, image.offset_data, image.size))


def _scan_tar(path: str) -> tuple["Rows", list[tuple[str, str]]]:
    """Every sample of a shard as Rows, and (member, problem) for each malformed one (reported by the caller)."""
    samples, problems = {}, []

    def rows(tar):
        for key, members in samples.items():
            caption = members.get("txt") or members.get("json")  # name the caption member in messages
            where = caption.name if caption else key
            try:
                yield _tar_row(tar, path, key, members)
            except MalformedRow as error:
                problems.append((where, str(error)))
            except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
                problems.append((where, f"unreadable caption ({error})"))

    try:
        with tarfile.open(path, mode="r:") as tar:  # uncompressed only: images are read back by seek
            for member in tar:
                name = MEMBER_NAME.match(member.name)
                if member.isfile() and name:
                    samples.setdefault(name[1], {})[name[2].lower()] = member  # key -> {extension: member}
            return Rows.from_rows(rows(tar)), problems
    except tarfile.TarError as error:
        raise DataError(f"{path}: not a readable uncompressed tar file ({error})") from error


def _shard_stamp(path: str) -> np.ndarray:
    """What identifies a shard's version: (index format, byte size, modification time in ns)."""
    stat = os.stat(path)
    return np.array([INDEX_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64)


def _read_tar(path: str, skip: RowSkipper, log) -> "Rows":
    """A shard's rows from its sidecar index `SHARD.tar.index.npz`, or scanned (and the sidecar written) when the
    sidecar is missing or the shard's size or modification time changed. Malformed samples are reported either way."""
    path, sidecar = os.path.abspath(path), os.path.abspath(path) + INDEX_SUFFIX
    stamp = _shard_stamp(path)
    try:
        with np.load(sidecar, allow_pickle=False) as index:  # arrays and strings only, never pickles
            fresh = np.array_equal(index["stamp"], stamp)
            if fresh:
                rows = Rows(index["text"], index["ends"], [path], np.zeros(len(index["ends"]), np.int32),
                            index["members"])
                problems = list(zip(index["problem_members"].tolist(), index["problems"].tolist()))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # none, torn or foreign: scan
        fresh = False
    if not fresh:
        rows, problems = _scan_tar(path)
        try:
            # every rank indexes the shards: each writes its own temporary file, the last rename wins
            with atomic_path(sidecar, per_process=True) as tmp, open(tmp, "wb") as f:
                np.savez(f, stamp=stamp, text=rows.text, ends=rows.ends, members=rows.members,
                         problem_members=np.array([m for m, _ in problems], dtype=str),
                         problems=np.array([p for _, p in problems], dtype=str))
        except OSError as error:  # a read-only data folder: the shard is rescanned next time
            log(f"warning: cannot write the tar index {sidecar} ({error}); the shard will be rescanned next time")
    for member, problem in problems:
        skip(f"{path}:{member}", problem)
    return rows


def read_rows(source: str, *, csv_img_key: str = "filepath", csv_caption_key: str = "title",
              csv_separator: str | None = None, strict: bool = False, log=print) -> "Rows":
    """Every row of `source`: paths joined by "::", each a .jsonl, .csv, .tsv or .tar file or a brace pattern of
    them ("shards/{000..009}.tar"). JSONL lines are {"image": path, "caption": str, "long_caption": str (optional)};
    CSV/TSV files have a header with `csv_img_key`, `csv_caption_key` and optionally "long_caption" columns
    (`csv_separator` None: "," for .csv, tab for .tsv). Malformed rows are skipped with a warning through `log`,
    or raise DataError "FILE:LINE: what is wrong" when `strict`; a file with no valid row raises DataError.
    Tar shards are indexed once: the index is kept next to each shard (`SHARD.tar.index.npz`) for the next run."""
    skip, parts = RowSkipper(strict, log), []
    for part in source.split("::"):
        for path in expand_braces(part):
            if not os.path.isfile(path):
                raise DataError(f"{path} does not exist: check the data path {source!r}")
            extension, skipped_before = path.rsplit(".", 1)[-1].lower(), skip.count
            if extension == "jsonl":
                file_rows = Rows.from_rows(_read_jsonl(path, skip))
            elif extension in ("csv", "tsv"):
                separator = csv_separator or ("\t" if extension == "tsv" else ",")
                file_rows = Rows.from_rows(_read_csv(path, csv_img_key, csv_caption_key, separator, skip))
            elif extension == "tar":
                file_rows = _read_tar(path, skip, log)
            else:
                raise DataError(f"{path}: unknown data format .{extension}: use .jsonl, .csv, .tsv or .tar files")
            if not len(file_rows):
                raise DataError(f"{path}: no valid image-caption rows ({skip.count - skipped_before} malformed "
                                f"skipped): see the format in miniproclip/data.py read_rows")
            parts.append(file_rows)
    if skip.count:
        shown = f", the first {MAX_WARNINGS} shown above" if skip.count > MAX_WARNINGS else ""
        log(f"warning: skipped {skip.count} malformed rows in {source}{shown}")
    return Rows.concat(parts)


def caption_texts(rows: Rows | list[Row]) -> list[str]:
    """Every distinct caption, short and long, in order of first appearance (the texts to embed with the LLM)."""
    return list(dict.fromkeys(text for row in rows for text in (row.caption, row.long_caption) if text is not None))
