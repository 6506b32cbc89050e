"""Stage 2's image pipeline per data-loader worker: images/s, decoding JPEGs at reduced size vs decoding them whole.

Each image goes through what a DataLoader worker of train.py runs for stage 2: `ImageTextDataset.__getitem__` with
the training crop (`RandomResizedCropTransform` on CLIP's preprocessing: read the file, decode, RandomResizedCrop of
90-100% of the area to 224×224, bicubic, rescale and normalise), on one thread, as a DataLoader worker runs. Two
ways, interleaved pass by pass over the same files (common.interleaved_times), each timed in CPU seconds of this
process (what a worker costs on a core of its own; wall time on the shared 2-core machine also counts the waits
for a core that other work holds):
- plain: decode the whole JPEG, then crop and resize (`draft=False`, the code before this change);
- draft: draw the crop box on the file's size first, and let libjpeg decode at 1/2, 1/4 or 1/8 size (Pillow's
  `draft`) when the crop still has ≥ 224 pixels a side there (`RandomResizedCropTransform.load`, now the default).
The photos are generated: quality-90 JPEGs of web photos' sizes (500×375, 1024×768, 2048×1536) with a photo's
spectrum (1/f^1.35 luminance, smoother colour, sensor-like grain): about 2-3 bits per pixel, as web photos at that
quality (the table prints their bytes). "mean |diff|" is the mean absolute difference of the two ways' 224×224 outputs in
levels of 0..255 (same crop boxes; only the decode differs).

Workers per GPU: the images/s one H100 consumes in a stage-2 step, derived, not measured: the FLOPs of the step per
image counted by bench/train_step.py (BENCHMARKS.md: 1.07 TFLOP for a step of 8 on the ViT-B/16 shape) plus the
text head at the paper's 4096-wide LLM embeddings, at the H100 peak and MFU of BENCHMARKS.md's paper-scale
projection (bench/scale.py). The CC3M epoch assumes one core per worker as fast as this machine's.

    python bench/loader.py            # 3 sizes, 48-144 images each, 11 rounds (about a minute on one core)
    python bench/loader.py --quick    # 2 sizes, 4-12 images each, 2 rounds (the CI smoke test)
"""

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common  # bench/common.py; also puts the repository on sys.path
import miniproclip.image as image_module
from miniproclip.data import Row
from miniproclip.image import OPENAI_CLIP_STD, ImageTransform, RandomResizedCropTransform
from miniproclip.loader import ImageTextDataset
from scale import DATASETS, GPU_PEAK, MFU  # bench/scale.py: the paper-scale projection's H100 and data sets

# (width, height) of the photos, one table row each -> how many times --images rows a pass reads: small photos load
# fast, and more of them keep a pass long enough (≈ 0.5 s) that a burst of load on a shared machine averages out
SIZES = {(500, 375): 3, (1024, 768): 1, (2048, 1536): 1}
QUALITY = 90
# Stage-2 step FLOPs per image: bench/train_step.py's count (ViT-B/16 student forward + backward, frozen teacher
# forward, a 576-wide head) plus the head at the paper's width (d = 4096, r = 8: 2 × 8d² weights, 6 FLOPs per weight
# for forward + backward)
STEP_FLOPS_PER_IMAGE = 1.07e12 / 8 + 6 * 2 * 8 * 4096**2
GPUS_PER_NODE, NODE_CORES = 8, 112  # a DGX H100: 8 GPUs, 2 × 56-core Xeon 8480C; one core per training process


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: 1/f^1.35 luminance, smoother 1/f^1.7 colour fields, and a little grain."""
    rng = np.random.default_rng(seed)
    frequency = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :])
    frequency = np.maximum(frequency, 1 / max(width, height))  # no infinite DC amplitude

    def field(exponent: float) -> np.ndarray:  # random phases, amplitude f^-exponent, standardised
        noise = rng.standard_normal((height, width)) + 1j * rng.standard_normal((height, width))
        values = np.fft.ifft2(noise / frequency**exponent).real
        return (values - values.mean()) / values.std()

    luminance = field(1.35)
    pixels = np.stack([luminance + 0.4 * field(1.7), luminance, luminance + 0.4 * field(1.7)], -1) * 45 + 115
    pixels += rng.normal(0, 1.2, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_photos(folder: Path, width: int, height: int, count: int) -> list[Path]:
    paths = []
    for seed in range(count):
        paths.append(folder / f"{width}x{height}-{seed}.jpg")
        photo(width, height, seed).save(paths[-1], format="JPEG", quality=QUALITY)
    return paths


@contextmanager
def counted_scales():
    """Counts of the DCT scales that drafted loads decode at, while the block runs (wraps image.draft_jpeg)."""
    scales, draft = Counter(), image_module.draft_jpeg

    def counted(*args):
        scales[scale := draft(*args)] += 1
        return scale
    image_module.draft_jpeg = counted
    try:
        yield scales
    finally:
        image_module.draft_jpeg = draft


def level_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |a - b| of two normalised (3, H, W) outputs, in levels of 0..255 (undoing the division by std)."""
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    return ((a - b).abs() * std).mean().item() * 255


def measure(folder: Path, width: int, height: int, count: int, args) -> dict:
    """Both ways over `count` rows of `args.photos` distinct photos: times, pixel difference, scales used."""
    paths = write_photos(folder, width, height, args.photos)
    rows = [Row(str(paths[i % len(paths)]), "a photo") for i in range(count)]  # every row its own crop
    datasets = {way: ImageTextDataset(rows, RandomResizedCropTransform(base=ImageTransform(), draft=way == "draft"))
                for way in ("plain", "draft")}
    with counted_scales() as scales:  # untimed: the two ways' outputs, and which decodes were drafted
        differences = [level_difference(datasets["draft"][i]["pixels"], datasets["plain"][i]["pixels"])
                       for i in range(len(rows))]
    passes = {way: (lambda dataset=dataset: [dataset[i]["pixels"] for i in range(len(rows))])
              for way, dataset in datasets.items()}
    # CPU time of this process: a worker's cost on a core of its own, whatever else the shared machine runs
    times = common.interleaved_times(passes, torch.device("cpu"), warmup=1, repeats=args.repeats,
                                     clock=time.process_time)
    return {"size": (width, height), "images": count, "bytes": statistics.mean(path.stat().st_size for path in paths),
            "scales": scales, "difference": statistics.mean(differences), "times": times,
            "rate": {way: len(rows) / statistics.median(seconds) for way, seconds in times.items()}}


def workers_per_gpu(rate: float) -> int:
    """Workers at `rate` images/s each that keep one H100's stage-2 step fed (the projection's images/s)."""
    return math.ceil(gpu_images_per_second() / rate)


def gpu_images_per_second() -> float:
    return MFU * GPU_PEAK / STEP_FLOPS_PER_IMAGE


def speed_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        (width, height), decoded = r["size"], r["scales"]
        rows.append([f"{width}×{height}", f"{r['bytes'] / 1024:.0f} ({8 * r['bytes'] / (width * height):.2f})",
                     ", ".join(f"{'full' if s == 1 else f'1/{s}'}: {n}" for s, n in sorted(decoded.items())),
                     f"{r['rate']['plain']:.0f}", f"{r['rate']['draft']:.0f}",
                     common.ratio_summary(r["times"]["plain"], r["times"]["draft"]), f"{r['difference']:.2f}",
                     workers_per_gpu(r["rate"]["plain"]), workers_per_gpu(r["rate"]["draft"])])
    return common.markdown_table(["photos", "JPEG KiB (bits/pixel)", "draft decodes at (images)", "plain images/s",
                                  "draft images/s", "speed-up (range)", "mean |diff| (of 255)",
                                  "workers per H100, plain", "workers per H100, draft"], rows)


def epoch_table(results: list[dict]) -> str:
    """A CC3M epoch on one 8-GPU node: the loading rate of its cores vs what the GPUs consume."""
    workers, images = NODE_CORES - GPUS_PER_NODE, DATASETS["CC3M"]
    gpus = GPUS_PER_NODE * gpu_images_per_second()
    rows = []
    for r in results:
        loading = {way: workers * rate for way, rate in r["rate"].items()}
        minutes = {way: images / min(rate, gpus) / 60 for way, rate in loading.items()}
        rows.append([f"{r['size'][0]}×{r['size'][1]}", f"{loading['plain']:,.0f}", f"{loading['draft']:,.0f}",
                     f"{minutes['plain']:.1f}", f"{minutes['draft']:.1f}", f"{images / gpus / 60:.1f}"])
    return common.markdown_table(["photos", f"{workers} workers' images/s, plain", "draft",
                                  "CC3M epoch min, plain", "draft", "epoch min if the GPUs were the bound"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Stage-2 image loading per worker: JPEG draft vs full decode.")
    common.add_machine_args(parser)
    parser.add_argument("--images", type=int, default=None,
                        help="rows a pass reads per size, 3× that for 500×375 (default 48; 4 --quick)")
    parser.add_argument("--photos", type=int, default=None, help="distinct photos per size (default 16; 2 --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per way (default 11; 2 --quick)")
    args = parser.parse_args(argv)
    args.threads = args.threads or 1  # a DataLoader worker runs torch on one thread
    common.setup(args)
    args.images = args.images or (4 if args.quick else 48)
    args.photos = args.photos or (2 if args.quick else 16)
    args.repeats = args.repeats or (2 if args.quick else 11)
    with tempfile.TemporaryDirectory() as folder:
        results = [measure(Path(folder), width, height, args.images * factor, args)
                   for (width, height), factor in list(SIZES.items())[:2 if args.quick else 3]]
    print(f"Stage-2 image pipeline per worker, quality-{QUALITY} JPEGs, "
          + ", ".join(f"{r['images']} {r['size'][0]}×{r['size'][1]}" for r in results)
          + f" images a pass ({args.photos} distinct photos of each size), median of {args.repeats} interleaved "
          "passes per way, in CPU seconds of this process (one thread):")
    print(speed_table(results))
    print(f"\nA CC3M epoch ({DATASETS['CC3M'] / 1e6:.1f}M images) on one node of {GPUS_PER_NODE} H100s and "
          f"{NODE_CORES} cores, one per training process and one per loader worker:")
    print(epoch_table(results))
    print(f"projection (derived, not measured): {STEP_FLOPS_PER_IMAGE / 1e9:.0f} GFLOP per image of a stage-2 "
          f"step at {MFU:.0%} MFU of {GPU_PEAK / 1e12:.0f} TFLOP/s = {gpu_images_per_second():,.0f} images/s per "
          f"H100; loader cores as fast as this machine's")
    print(common.machine_line(torch.device("cpu"), torch.float32))


if __name__ == "__main__":
    sys.exit(main())
