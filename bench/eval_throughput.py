"""The benchmark suite's encoding path: images/s and texts/s of eval.py's way against a plain loop, side by side.

- eval path: `evaluation.encode_images` (a DataLoader with --workers processes decoding and transforming, batches
  of --batch-size through the image tower) and `evaluation.encode_texts` (batches of captions through the text
  tower), exactly what `run_retrieval` / `run_zeroshot` (and so the suite, miniproclip/benchmarks/suite.py) run;
- plain loop: one image at a time (load_image, the transform, a forward of batch 1), one caption at a time.
Both run on the same random-weight CLIP folder of ViT-B/16's shape (--quick: a tiny one) over generated 500×375
JPEGs and captions, interleaved round by round (common.interleaved_times), each reporting its median.

    python bench/eval_throughput.py            # ViT-B/16 shape, 64 images, 256 captions, 3 rounds
    python bench/eval_throughput.py --quick    # tiny shapes (the CI smoke test)
"""

import argparse
import os
import statistics
import tempfile

import numpy as np
import torch
import transformers
from PIL import Image

import common  # bench/common.py; also puts the repository on sys.path
from miniproclip import evaluation
from miniproclip.image import load_image
from miniproclip.tokenizer import save_clip_tokenizer_json


def write_clip(folder: str, quick: bool) -> None:
    """A random CLIP of ViT-B/16's shape (or a tiny one) with the real CLIP tokenizer; CLIP's 224px preprocessing."""
    if quick:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=32)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    else:
        config = transformers.CLIPConfig(vision_config=dict(patch_size=16, image_size=224), projection_dim=512)
    transformers.CLIPModel(config).save_pretrained(folder)
    save_clip_tokenizer_json(os.path.join(folder, "tokenizer.json"))


def write_photos(folder: str, count: int) -> list[str]:
    """500×375 quality-90 JPEGs of smooth noise (a web photo's size)."""
    rng, paths = np.random.default_rng(0), []
    for i in range(count):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        path = os.path.join(folder, f"{i}.jpg")
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_machine_args(parser)
    parser.add_argument("--images", type=int, default=64, help="images per pass")
    parser.add_argument("--texts", type=int, default=256, help="captions per pass")
    parser.add_argument("--batch-size", type=int, default=64, help="the eval path's batch (eval.py's default)")
    parser.add_argument("--workers", type=int, default=2, help="the eval path's loader workers (eval.py's default)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.texts, args.rounds = 8, 16, 1
    device, _ = common.setup(args)
    with tempfile.TemporaryDirectory() as root:
        write_clip(os.path.join(root, "clip"), args.quick)
        encoders = evaluation.clip_encoders(os.path.join(root, "clip"), str(device), "fp32")
        os.makedirs(os.path.join(root, "photos"))
        paths = write_photos(os.path.join(root, "photos"), args.images)
        texts = [f"a photo of {i} red cats sitting on a wooden table beside a window" for i in range(args.texts)]

        def plain_images():
            for path in paths:  # load, transform, forward: one image at a time
                encoders.encode_image(encoders.transform(load_image(path))[None].to(device))

        contenders = {
            "images: eval path": lambda: evaluation.encode_images(encoders, paths, args.batch_size, args.workers,
                                                                  str(device)),
            "images: plain loop": plain_images,
            "texts: eval path": lambda: evaluation.encode_texts(encoders, texts, args.batch_size),
            "texts: plain loop": lambda: [encoders.encode_text([text]) for text in texts]}
        times = common.interleaved_times(contenders, device, warmup=1, repeats=args.rounds)
    rows = []
    for name, seconds in times.items():
        count = args.images if name.startswith("images") else args.texts
        rows.append([name, count, f"{statistics.median(seconds):.2f}", f"{count / statistics.median(seconds):.1f}"])
    print(common.markdown_table(["path", "items", "seconds (median)", "items/s"], rows))
    print(common.machine_line(device, torch.float32) + f", batch {args.batch_size}, workers {args.workers}")


if __name__ == "__main__":
    main()
