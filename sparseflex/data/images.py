"""Input images for image-to-3D: reading any common image file, and cropping the object into the square the image
encoder (:class:`~sparseflex.models.image_encoder.ImageEncoder`) expects.

:func:`preprocess_image` follows TRELLIS' preprocessing: find the object (its mask), crop a centred square of 1.2x
the mask's longer side around the mask's bounding-box centre, resize it with Lanczos and premultiply alpha, so the
background is black. The object's mask comes from, in this order:

* the alpha channel, when the image has one that is not fully opaque: pixels with alpha > 0.8 (TRELLIS' threshold);
* else a plain background: when every pixel of the four corner patches (each ``max(2, 2 %)`` of the shorter side
  square) lies within :data:`BACKGROUND_TOLERANCE` (16/255, enough for JPEG noise) of their median colour in every
  channel, that median is the background, and the object is every pixel farther than the tolerance from it in some
  channel (its alpha is 1, the background's 0);
* else there is no way to tell the object from the background without a segmentation model, and the image is
  refused with a message asking for an RGBA image with a transparent background.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

#: Largest image (pixels) :func:`load_image` decodes; the size is read from the header before any decoding, so a
#: decompression bomb (a small file that decodes to gigabytes) is refused before it costs memory.
MAX_PIXELS = 64_000_000
#: Largest per-channel difference from the background colour still counted as background (RGB in [0, 1]).
BACKGROUND_TOLERANCE = 16 / 255
#: Pixels with more alpha than this are the object (TRELLIS' bounding-box threshold).
ALPHA_THRESHOLD = 0.8
#: The crop's side relative to the mask's longer side.
CROP_MARGIN = 1.2


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file as float32 RGBA ``[H, W, 4]`` in [0, 1], alpha straight (not premultiplied).

    Reads what Pillow reads (PNG, JPEG, WebP, ...), 8 or 16 bit, grey, grey + alpha, RGB, RGBA or palette (its
    transparency becomes alpha); images without alpha get alpha 1. 16-bit grey keeps its precision; Pillow reads
    16-bit colour at 8 bits. The EXIF orientation of photos is applied; of an
    animation, the first frame is read. An unreadable, truncated or too large file (over ``max_pixels``) is a
    one-line :class:`InputError` naming it.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such image file")
    if not p.is_file():
        raise InputError(f"{p}: not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size  # from the header: nothing is decoded yet
                if w * h > max_pixels:
                    raise InputError(f"{p}: image of {w}x{h} pixels is larger than {max_pixels / 1e6:g} megapixels "
                                     f"(refused as a possible decompression bomb)")
                if w == 0 or h == 0:
                    raise InputError(f"{p}: image has no pixels")
                im.load()
                im = ImageOps.exif_transpose(im)
                rgba = _to_rgba(im)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{p}: refused as a possible decompression bomb ({exc})".splitlines()[0]) from None
    except UnidentifiedImageError:
        raise InputError(f"{p}: not an image file Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data, unknown mode
        raise InputError(f"{p}: unreadable or truncated image ({exc})".splitlines()[0]) from None
    return rgba


def _to_rgba(im) -> np.ndarray:
    """Float RGBA in [0, 1] of a loaded Pillow image of any mode, keeping 16-bit precision where Pillow has it."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (Pillow keeps 16-bit PNG grey as I;16, older versions as I)
        grey = np.asarray(im, dtype=np.float64) / 65535.0
        grey = np.clip(grey, 0.0, 1.0).astype(np.float32)
        return np.dstack([grey, grey, grey, np.ones_like(grey)])
    if im.mode == "F":
        grey = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
        return np.dstack([grey, grey, grey, np.ones_like(grey)])
    # every other mode (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, ...): Pillow converts, palette transparency included
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(rgba)


def _corner_pixels(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    k = max(2, round(0.02 * min(h, w)))
    k = min(k, h, w)
    corners = [rgb[:k, :k], rgb[:k, w - k:], rgb[h - k:, :k], rgb[h - k:, w - k:]]
    return np.concatenate([c.reshape(-1, 3) for c in corners])


def object_mask(rgba: np.ndarray, name: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """The object's mask ``[H, W]`` bool and the alpha ``[H, W]`` to premultiply with (see the module's rules)."""
    alpha = rgba[..., 3]
    if (alpha < 1.0).any():
        mask = alpha > ALPHA_THRESHOLD
        if not mask.any():
            raise InputError(f"{name}: the image is fully transparent (no pixel has alpha > {ALPHA_THRESHOLD}); "
                             f"nothing to crop")
        return mask, alpha
    rgb = rgba[..., :3]
    corners = _corner_pixels(rgb)
    background = np.median(corners, axis=0)
    if np.abs(corners - background).max() > BACKGROUND_TOLERANCE:
        raise InputError(f"{name}: no alpha channel and no plain background; give an RGBA image with a transparent "
                         f"background (cut the object out first)")
    mask = (np.abs(rgb - background) > BACKGROUND_TOLERANCE).any(axis=-1)
    if not mask.any():
        raise InputError(f"{name}: the image is all background (a single plain colour); nothing to crop")
    return mask, mask.astype(np.float32)


def crop_box(mask: np.ndarray) -> tuple[float, float, float]:
    """Centre ``(cx, cy)`` and side, in pixel-edge coordinates, of the square crop around ``mask``: centred on the
    bounding box of its pixels (edges included: a single pixel at column 3 spans x in [3, 4]), with side
    :data:`CROP_MARGIN` times the box's longer side."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    side = CROP_MARGIN * max(x1 - x0, y1 - y0)
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0, float(side)


def preprocess_image(image: str | os.PathLike | np.ndarray, size: int = 518) -> torch.Tensor:
    """An image (a file, or an RGBA / RGB float array in [0, 1] as :func:`load_image` gives) as the encoder's input:
    ``[3, size, size]`` float32 in [0, 1], the object cropped into a centred square and premultiplied onto black.

    Parts of the square outside the image are transparent black. Images without an object mask (see the module
    docstring) are a one-line :class:`InputError`.
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        name = "image array"
        rgba = np.asarray(image, dtype=np.float32)
        if rgba.ndim != 3 or rgba.shape[-1] not in (3, 4) or rgba.shape[0] == 0 or rgba.shape[1] == 0:
            raise InputError(f"{name}: expected [H, W, 3] or [H, W, 4]; got shape {list(rgba.shape)}")
        if not np.isfinite(rgba).all():
            raise InputError(f"{name}: values that are not finite")
        if rgba.shape[-1] == 3:
            rgba = np.dstack([rgba, np.ones(rgba.shape[:2], np.float32)])
        rgba = np.clip(rgba, 0.0, 1.0)
    else:
        name = str(image)
        rgba = load_image(image)
    if not isinstance(size, int) or size < 1:
        raise InputError(f"{name}: output size must be a positive integer; got {size!r}")

    mask, alpha = object_mask(rgba, name)
    cx, cy, side = crop_box(mask)
    premultiplied = rgba[..., :3] * alpha[..., None]

    # Copy the square, plus a margin for the Lanczos kernel's reach (3 lobes, in input pixels when shrinking),
    # into a transparent-black canvas: that is the padding where the square leaves the image, and it keeps the
    # memory to the crop's size however large the image is.
    reach = math.ceil(3 * max(side / size, 1.0)) + 2
    left, top = math.floor(cx - side / 2) - reach, math.floor(cy - side / 2) - reach
    right, bottom = math.ceil(cx + side / 2) + reach, math.ceil(cy + side / 2) + reach
    canvas = np.zeros((bottom - top, right - left, 3), np.float32)
    h, w = mask.shape
    sy0, sy1, sx0, sx1 = max(top, 0), min(bottom, h), max(left, 0), min(right, w)
    canvas[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = premultiplied[sy0:sy1, sx0:sx1]

    # Lanczos per channel on float ("F") images, with the square as a sub-pixel box of the canvas
    box = (cx - side / 2 - left, cy - side / 2 - top, cx + side / 2 - left, cy + side / 2 - top)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(canvas[..., c]))
                           .resize((size, size), Image.Resampling.LANCZOS, box=box)) for c in range(3)]
    out = np.clip(np.stack(channels), 0.0, 1.0)  # Lanczos rings slightly past [0, 1] at sharp edges
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
