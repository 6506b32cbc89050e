"""From rows to training batches: the map-style Dataset, exact DDP batching and the DataLoader.

`ImageTextDataset` reads a row's image (a file, or a tar member by seek at the offset data.py recorded) and applies
the transform (one with a `load` method, stage 2's random crop, reads the file itself, to decode a JPEG at reduced
size when its crop allows it); an unreadable image becomes a "bad_image" sample that `collate` drops and the
trainer counts.
`epoch_batches` cuts one seeded permutation per epoch into global batches, so a W-rank run sees the same samples as
a 1-rank run with a W times larger batch, and a mid-epoch resume skips exactly the batches already done.
"""

import io
import os
import signal
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import DataError, Row
from .image import ImageReadError, load_image

MAX_OPEN_SHARDS = 64  # tar files a worker process keeps open (least recently used closed first)


class ImageTextDataset(Dataset):
    """Map-style dataset over Rows. Item i: {"index", "pixels" (3, H, W) or None, "caption", "long_caption"}, plus
    "bad_image": path when the image cannot be read. transform=None: images are not read at all (stage 1)."""

    def __init__(self, rows: list[Row], transform=None, seed: int = 0):
        self.rows, self.transform = rows, transform
        # a random transform draws from a generator seeded by (seed, epoch, index): the same crops whatever the
        # number of workers or ranks, and after a resume; the trainer sets `epoch` before each epoch's loader
        self.seed, self.epoch = seed, 0
        self._shards = OrderedDict()  # tar path -> open file of this process, least recently used first
        self._shards_pid = os.getpid()  # the process the open files belong to

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": OrderedDict()}  # spawned workers receive a copy without open files

    def _read_tar_member(self, tar_path: str, offset: int, size: int) -> bytes:
        if self._shards_pid != os.getpid():  # a forked worker: the parent's files share their read position
            self._shards, self._shards_pid = OrderedDict(), os.getpid()
        shard = self._shards.pop(tar_path, None) or open(tar_path, "rb")
        self._shards[tar_path] = shard  # now the most recently used
        if len(self._shards) > MAX_OPEN_SHARDS:
            self._shards.popitem(last=False)[1].close()
        shard.seek(offset)
        return shard.read(size)

    def _load_pixels(self, row: Row, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index)
        if row.tar_member is None:
            source = row.image
        else:
            try:
                source = io.BytesIO(self._read_tar_member(*row.tar_member))  # a short read fails to decode
            except OSError as error:
                raise ImageReadError(f"cannot read {row.image}: {error}") from error
        load = getattr(self.transform, "load", None)  # a transform that opens the file itself (JPEG draft)
        return load(source, generator) if load else self.transform(load_image(source), generator)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        sample = {"index": index, "pixels": None, "caption": row.caption, "long_caption": row.long_caption}
        if self.transform is not None:
            try:
                sample["pixels"] = self._load_pixels(row, index)  # (3, H, W)
            except ImageReadError:
                sample["bad_image"] = row.image
        return sample


def collate(samples: list[dict]) -> dict:
    """Batch dataset items, dropping those whose image could not be read. Returns "indices", "bad_images" (the
    references of the dropped images, for the caller to count and log) and, for ImageTextDataset items, "pixels"
    (B, 3, H, W), or None when images are not loaded or all were bad, "captions" and "long_captions" (None where
    a row has none). Items of other datasets (stage 0's groups) carry an "index" only."""
    kept = [sample for sample in samples if "bad_image" not in sample]
    batch = {"indices": [sample["index"] for sample in kept],
             "bad_images": [sample["bad_image"] for sample in samples if "bad_image" in sample]}
    if samples and "caption" in samples[0]:
        pixels = [sample["pixels"] for sample in kept if sample["pixels"] is not None]
        batch["pixels"] = torch.stack(pixels) if pixels else None  # (B, 3, H, W)
        batch["captions"] = [sample["caption"] for sample in kept]
        batch["long_captions"] = [sample["long_caption"] for sample in kept]
    return batch


def count_bad_images(paths, cursor, log):
    """Unreadable images are dropped from the batch, counted, and the first 10 named."""
    for path in paths:
        cursor.bad_images += 1
        if cursor.bad_images <= 10:
            cursor.bad_image_paths.append(path)
            log(f"skipped unreadable image {path}" + (" (further ones are only counted)"
                                                      if cursor.bad_images == 10 else ""))


def epoch_batches(num_rows: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1, sources: list[int] | None = None) -> list[list[int]]:
    """This rank's row indices for each step of one epoch. A permutation seeded by (seed, epoch) is cut into global
    batches of batch_size * world_size (the incomplete tail dropped) and rank r takes slice r of each, so the ranks'
    step-t batches, concatenated, are the step-t batch of a 1-rank run with batch_size * world_size. Resuming
    mid-epoch is skipping the batches already done (make_loader's start_batch).

    With `sources` (a source id per row), every global batch holds rows of one source: each source's rows are cut
    into global batches (its tail dropped) and the batches of all sources are shuffled together. Stage 0 draws its
    batches so (LLM2Vec's data loader, one dataset per batch): texts of different kinds in one batch would make the
    kind, not the meaning, the easiest thing to tell apart."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    global_batch = batch_size * world_size
    if num_rows < global_batch:
        raise DataError(f"{num_rows} rows do not fill one global batch of {batch_size} x {world_size} ranks: "
                        f"lower batch_size (--batch-size)")
    # torch's CPU generator keeps only 32 bits of its seed: numpy's SeedSequence hashes the pair into them
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    order = torch.randperm(num_rows, generator=generator).tolist()
    by_source = {}  # source id -> its rows in this epoch's order (one source when `sources` is None)
    for row in order:
        by_source.setdefault(sources[row] if sources is not None else 0, []).append(row)
    global_batches = [rows[step * global_batch:(step + 1) * global_batch]
                      for _, rows in sorted(by_source.items()) for step in range(len(rows) // global_batch)]
    if sources is not None:  # interleave the sources' batches
        global_batches = [global_batches[i] for i in torch.randperm(len(global_batches), generator=generator)]
    start = rank * batch_size  # this rank's offset inside each global batch
    return [batch[start:start + batch_size] for batch in global_batches]


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
CAN_BLOCK_SIGNALS = hasattr(signal, "pthread_sigmask")  # not on Windows


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Ctrl-C and schedulers (SLURM) signal the whole process group: a worker killed by SIGTERM would crash the
    trainer mid-step, so workers ignore SIGINT/SIGTERM; the trainer saves and closes the loader, which ends them.
    The worker starts with them blocked (make_loader): setting SIG_IGN discards any already pending."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if CAN_BLOCK_SIGNALS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def make_loader(dataset: Dataset, batches: list[list[int]], workers: int, start_batch: int = 0,
                seed: int | None = None) -> Iterator[dict]:
    """Yields collated `batches[start_batch:]` in order, read by `workers` processes (0: in-process).

    With `seed`, the workers' base seed (their torch RNG, e.g. random crops) is drawn from a generator seeded by it
    instead of from the global RNG, which the loader would otherwise advance by one draw when iterated: at each
    epoch start, and at a resume, where it shifts what the global RNG gives dropout after it."""
    loader = DataLoader(dataset, batch_sampler=batches[start_batch:], num_workers=workers, collate_fn=collate,
                        persistent_workers=False, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=_leave_stop_signals_to_the_trainer,
                        generator=None if seed is None else torch.Generator().manual_seed(seed))
    if not CAN_BLOCK_SIGNALS:
        yield from loader
        return
    # iter() starts the workers. A stop signal that reached one between its start and worker_init_fn would kill
    # it (torch's worker SIGTERM handler, Python's KeyboardInterrupt) and the trainer with it, so the workers are
    # started with the signals blocked, which they inherit; here, the trainer's pending ones arrive on unblocking.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        batches_in_order = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    yield from batches_in_order
