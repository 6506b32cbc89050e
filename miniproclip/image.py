"""CLIP image preprocessing: RGB, short-side bicubic resize, center crop, rescale to [0, 1], normalize.

Mirrors the PIL/NumPy path of transformers' CLIP image processor (`CLIPImageProcessorPil` in transformers 5.x,
`CLIPImageProcessor` in 4.x: image_processing_backends.PilBackend, image_transforms.convert_to_rgb,
get_resize_output_image_size, center_crop, rescale, normalize), reading the same preprocessor_config.json.
The output equals HF's to float32 rounding. openai/CLIP's torchvision `_transform` does the same steps but rounds
the crop offset with round() where HF floors, and drops alpha where HF (5.x) composites it onto white.

`RandomResizedCropTransform` is the training transform of the official ProCLIP code (open_clip's
`RandomResizedCrop(scale=(0.9, 1.0))`, bicubic, then the same rescale and normalization): stage 2's default. Its
`load` reads a file itself: it draws the crop box on the file's size before decoding, so a JPEG is decoded at 1/2,
1/4 or 1/8 of its size (libjpeg's DCT scaling, Pillow's `draft`) whenever the crop still has the output resolution
there; the box and the random draws are the same as without it, only the pixels the resize reads are the reduced
decode's (bench/loader.py: the speed-up and the pixel difference).
"""

import dataclasses
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .weights import ModelFolderError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageReadError(UserError, ValueError):
    """An image file that cannot be opened or decoded (data loaders catch it to skip and count)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparent pixels are composited onto white (transformers 5.x convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


@contextmanager
def opened_image(source):
    """`Image.open(source)` (a path or a binary file) for a with block, not decoded yet (a JPEG can still be
    drafted); failing to open it, or to decode it inside the block, raises ImageReadError naming `source`."""
    try:
        with Image.open(source) as image:
            yield image
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"cannot read image {source}: {error}") from error


@dataclass(frozen=True, eq=False)
class ArrayImage:
    """Image `index` of a (N, H, W, 3) uint8 array that a data set ships instead of files (CIFAR's pickles): a
    benchmark lists one per image where it would list paths, and load_image turns each into a PIL image only when
    the runner's loader asks for it. str() names it for reports: "<file>[<index>]"."""
    pixels: np.ndarray = dataclasses.field(repr=False)  # (N, H, W, 3) uint8 RGB, shared by all images of the set
    index: int
    file: str  # the file the pixels were read from

    def __str__(self):
        return f"{self.file}[{self.index}]"


def load_image(source) -> Image.Image:
    """Open and decode an image file (a path or a binary file) as RGB; ImageReadError naming it if that fails.
    An ArrayImage is taken as it is: its pixels are RGB already."""
    if isinstance(source, ArrayImage):
        return Image.fromarray(source.pixels[source.index])  # (H, W, 3) uint8
    with opened_image(source) as image:
        return to_rgb(image)  # convert() decodes the whole file, so truncated data fails here


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(H, W) with the short side = shortest_edge; the long side is truncated, as HF and torchvision do."""
    short, long = min(height, width), max(height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Central (crop_height, crop_width) window of (H, W, C) pixels with HF's offsets; zero-pads a smaller image."""
    height, width = pixels.shape[:2]
    padded_height, padded_width = max(crop_height, height), max(crop_width, width)
    if (padded_height, padded_width) != (height, width):
        # HF centres the image on a zero canvas, rounding its offset up: ceil((padded - size) / 2)
        top, left = -(-(padded_height - height) // 2), -(-(padded_width - width) // 2)
        canvas = np.zeros((padded_height, padded_width, pixels.shape[2]), dtype=pixels.dtype)
        canvas[top : top + height, left : left + width] = pixels
        pixels = canvas
    # the crop offset rounds down: (size - crop) // 2
    top, left = (padded_height - crop_height) // 2, (padded_width - crop_width) // 2
    return pixels[top : top + crop_height, left : left + crop_width]  # (crop_height, crop_width, C)


def _size_from_config(value, key: str, path: str, square: bool):
    """HF's size dicts: {"shortest_edge": N} -> N, {"height", "width"} -> (H, W); a bare int N is either."""
    if isinstance(value, int):
        return (value, value) if square else value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return (value["height"], value["width"])
    if isinstance(value, dict) and set(value) == {"shortest_edge"} and not square:
        return value["shortest_edge"]
    raise ModelFolderError(f"{path}: unsupported {key} {value!r}: use {{'shortest_edge': N}}, "
                     f"{{'height': H, 'width': W}} or an int")


@dataclass
class ImageTransform:
    size: int | tuple[int, int] | None = 224  # int: short side -> size, aspect kept; (H, W): exact; None: no resize
    crop_size: tuple[int, int] | None = (224, 224)  # (H, W) center crop; None: no crop
    rescale_factor: float | None = 1 / 255  # uint8 -> [0, 1]; None: keep 0..255
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN  # per channel; None: no normalization
    std: tuple[float, ...] | None = OPENAI_CLIP_STD
    resample: int = 3  # PIL.Image.Resampling value; 3 = BICUBIC, CLIP's filter
    convert_rgb: bool = True  # False: the caller promises RGB input

    @classmethod
    def from_folder(cls, folder: str) -> "ImageTransform":
        """Read HF's preprocessor_config.json in `folder` (CLIP's or SigLIP's); CLIP's defaults when there is none
        (backbones.py also reads an open_clip folder's preprocess_cfg)."""
        path = os.path.join(folder, "preprocessor_config.json")
        if not os.path.isfile(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as error:
            raise ModelFolderError(f"{path} is not valid JSON ({error}): fix or delete it") from error
        size = _size_from_config(config.get("size", 224), "size", path, square=False)
        crop_size = _size_from_config(config.get("crop_size", 224), "crop_size", path, square=True)
        # SigLIP's processors (SiglipImageProcessor[Pil]) resize to {height, width} and have no crop step
        squash = str(config.get("image_processor_type", "")).startswith("Siglip")
        return cls(
            size=size if config.get("do_resize", True) else None,
            crop_size=crop_size if config.get("do_center_crop", True) and not squash else None,
            rescale_factor=config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else None,
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)) if config.get("do_normalize", True) else None,
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)) if config.get("do_normalize", True) else None,
            resample=config.get("resample", 3),
            convert_rgb=config.get("do_convert_rgb", True),
        )

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """PIL image -> (3, H, W) float32 pixels for the vision tower. Deterministic: `generator` is unused (it
        is accepted so the data set can hand every training transform its per-sample generator)."""
        if self.convert_rgb:
            image = to_rgb(image)
        if image.mode != "RGB":
            raise ValueError(f"ImageTransform needs an RGB image, got mode {image.mode}: set convert_rgb=True")
        if self.size is not None:
            if isinstance(self.size, tuple):
                height, width = self.size
            else:
                height, width = resize_output_size(image.height, image.width, self.size)
            image = image.resize((width, height), resample=Image.Resampling(self.resample))  # PIL takes (W, H)
        pixels = np.asarray(image)  # (H, W, 3) uint8
        if self.crop_size is not None:
            pixels = center_crop(pixels, *self.crop_size)
        # HF rescales in float64 and casts to float32, then normalizes in float32
        if self.rescale_factor is not None:
            pixels = pixels.astype(np.float64) * self.rescale_factor
        pixels = pixels.astype(np.float32)  # (H, W, 3)
        if self.mean is not None:
            pixels = (pixels - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, H, W)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) as torchvision's RandomResizedCrop.get_params draws it.

    Up to 10 tries of an area fraction uniform in `scale` and an aspect ratio log-uniform in `ratio`; if none
    fits inside the image, the largest centred crop whose ratio is clamped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = torch.randint(0, height - crop_height + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - crop_width + 1, size=(1,), generator=generator).item()
            return left, top, crop_width, crop_height
    in_ratio = width / height  # fallback: a centre crop with the ratio clamped into `ratio`
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


DCT_SCALES = (8, 4, 2)  # the size reductions libjpeg's scaled inverse DCT decodes at, largest first


def jpeg_draft_scale(crop_width: int, crop_height: int, out_width: int, out_height: int) -> int:
    """The largest s of 8, 4, 2 at which a crop_width × crop_height crop still has ≥ out_width × out_height
    pixels, so that the resize after a 1/s decode still only shrinks; 1 if none."""
    return next((s for s in DCT_SCALES if crop_width >= s * out_width and crop_height >= s * out_height), 1)


def draft_jpeg(image: Image.Image, crop_width: int, crop_height: int, out_width: int, out_height: int) -> int:
    """Make an opened, not yet decoded JPEG decode at 1/s of its size, s = jpeg_draft_scale(...), and return s:
    original pixel coordinates divided by s are the drafted image's. 1 (nothing changed) for other formats."""
    scale = jpeg_draft_scale(crop_width, crop_height, out_width, out_height)
    if scale == 1 or image.format != "JPEG":
        return 1
    width, height = image.size
    # Pillow decodes at the largest s of 8, 4, 2, 1 with min(width // request_w, height // request_h) >= s: this
    # request gives exactly `scale`, and libjpeg's output is ceil(size / scale)
    image.draft("RGB", (width // scale, height // scale))
    return scale if image.size == (-(-width // scale), -(-height // scale)) else 1  # a no-op draft: full size


@dataclass(kw_only=True)
class RandomResizedCropTransform:
    """Training transform: a random crop of 90-100% of the image's area, resized to the model's input size.

    Draws from the `generator` of the call (the data set passes one seeded by (seed, epoch, sample), so crops do
    not depend on workers, ranks or resumes), else from the field `generator`, else from torch's global RNG.
    """
    base: ImageTransform  # its crop_size is the output size; its rescale and normalization are applied after
    scale: tuple[float, float] = (0.9, 1.0)  # area fraction (official ProCLIP / open_clip stage-2 setting)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range (torchvision's default)
    generator: torch.Generator | None = None
    draft: bool = True  # load(): decode a JPEG at reduced size (DCT scaling) where the crop allows it

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """PIL image -> (3, H, W) float32 pixels, H, W = base.crop_size (or base.size when square)."""
        if self.base.convert_rgb:
            image = to_rgb(image)
        left, top, width, height = random_resized_crop_box(image.width, image.height, self.scale, self.ratio,
                                                           generator or self.generator)
        return self._crop(image, (left, top, left + width, top + height))

    def load(self, source, generator: torch.Generator | None = None) -> torch.Tensor:
        """Read an image file (a path or a binary file) and transform it: the pixels of
        `self(load_image(source), generator)` (equal unless a JPEG is drafted), with the same crop box and the same
        draws from the generator, but a JPEG whose crop is ≥ 2× the output size in both dimensions is decoded at
        1/2, 1/4 or 1/8 size (`draft_jpeg`), which costs a fraction of the full decode and of the resize after it.
        Raises ImageReadError if the file cannot be opened or decoded."""
        out_width, out_height = self._output_size()
        with opened_image(source) as image:
            # the box is drawn on the file's own size, before anything is decoded
            left, top, width, height = random_resized_crop_box(image.width, image.height, self.scale, self.ratio,
                                                               generator or self.generator)
            scale = draft_jpeg(image, width, height, out_width, out_height) if self.draft else 1
            image = to_rgb(image)  # decodes (at 1/scale of the size); a broken file fails here
        box = (left, top, left + width, top + height)
        return self._crop(image, box if scale == 1 else tuple(coordinate / scale for coordinate in box))

    def _output_size(self) -> tuple[int, int]:
        """(width, height) of the output."""
        size = self.base.size if isinstance(self.base.size, tuple) else (self.base.size, self.base.size)
        out_height, out_width = self.base.crop_size or size  # SigLIP's transform: no crop, an (H, W) resize
        return out_width, out_height

    def _crop(self, image: Image.Image, box: tuple[float, float, float, float]) -> torch.Tensor:
        """Resize the (left, top, right, bottom) box of `image` to the output size, then rescale and normalize."""
        image = image.resize(self._output_size(), resample=Image.Resampling(self.base.resample),
                             box=box)  # crop and resize in one PIL call; a fractional box is sampled exactly
        return dataclasses.replace(self.base, size=None, crop_size=None)(image)  # rescale + normalize only
