"""Image decoding and ADM's `center_crop_arr` (guided-diffusion, image_datasets.py), used by the
encode stage and, later, by FID on real images. Output: uint8 HxWx3 numpy arrays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .fetch import DataError


class DecodeError(DataError):
    """An image file that PIL cannot decode; the message names the file."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode any PIL-readable file to RGB. The format comes from the content, not the name, so
    ImageNet's PNG named .JPEG works; CMYK and grayscale go through PIL's convert("RGB") as in ADM."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a resize
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM: BOX-halve while the short side >= 2x target, BICUBIC-resize the short side to the
    target (upsampling images smaller than the crop), then take the centre square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]
