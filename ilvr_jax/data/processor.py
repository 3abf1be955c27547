"""Qwen2.5-VL image preprocessing and chat prompt, in NumPy/PIL.

Bit-for-bit the computation of HF's ``Qwen2VLImageProcessorPil`` (the slow processor) and
the prompt expansion of ``Qwen2_5_VLProcessor``:

1. RGB conversion; transparency is composited onto white. A file is first turned upright
   by its EXIF orientation, as HF's ``load_image`` does (``image_size`` reports that size).
2. ``smart_resize``: both sides multiples of ``factor = patch_size * merge_size`` (28), the
   pixel count within ``[min_pixels, max_pixels]``, aspect ratio kept as closely as possible;
   resized with PIL's bicubic filter on the uint8 image.
3. ``x = uint8 * rescale_factor`` (in float64, then float32), ``x = (x - mean) / std`` in
   float32 with the CLIP mean/std.
4. Patchify: ``[C, H, W]`` -> ``[gh*gw, C*T*p*p]`` with rows ordered
   ``(gh/2, gw/2, merge_row, merge_col)`` (so each 2x2 merge group is contiguous) and each row
   flattened channel-major as ``(C, T, p, p)``; the single frame is repeated to the temporal
   patch size ``T = 2``. ``grid_thw = (1, gh, gw)``.

In the prompt every image becomes ``<|vision_start|>`` + ``t*h*w / merge_size**2`` x
``<|image_pad|>`` + ``<|vision_end|>``. Question images go before the question text, or, when
the text holds ``<image>`` placeholders, each in place of one placeholder (``user_messages``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ilvr_jax import storage
from ilvr_jax.data.records import IMAGE_PLACEHOLDER

# OpenAI CLIP normalisation (HF's OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

# HF's Qwen2VLImageProcessor class default, used when a config gives no size at all.
HF_DEFAULT_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """The knobs of Qwen2.5-VL's image processor (defaults: Qwen2.5-VL-7B-Instruct's)."""

    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: 3 * T * p * p (1176 for Qwen2.5-VL)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_hf(cls, dir_or_dict: str | os.PathLike | dict[str, Any]) -> "ImageProcessorConfig":
        """Reads ``preprocessor_config.json`` (a directory, a file path or the parsed dict).

        The pixel budget follows HF's ``Qwen2VLImageProcessor.__init__``: start from ``size``
        (``shortest_edge`` / ``longest_edge``; HF's class default ``56*56`` / ``28*28*1280``
        when ``size`` is absent or null), then a non-null top-level ``min_pixels`` replaces
        ``shortest_edge`` and a non-null ``max_pixels`` replaces ``longest_edge``. A budget that
        ends up without either bound is a ``ValueError`` (HF fails on it when resizing).
        """
        if isinstance(dir_or_dict, dict):
            d, where = dir_or_dict, "image processor config"
        else:
            where = os.fspath(dir_or_dict)
            if storage.isdir(where):
                where = storage.join(where, "preprocessor_config.json")
            d = json.loads(storage.read_text(where))
        size = dict(HF_DEFAULT_SIZE) if d.get("size") is None else dict(d["size"])
        if d.get("min_pixels") is not None:
            size["shortest_edge"] = d["min_pixels"]
        if d.get("max_pixels") is not None:
            size["longest_edge"] = d["max_pixels"]
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise ValueError(f"{where}: no pixel budget: size needs shortest_edge and longest_edge (or top-level "
                             f"min_pixels / max_pixels), got size={d.get('size')!r}")
        defaults = cls()
        return cls(
            min_pixels=int(size["shortest_edge"]),
            max_pixels=int(size["longest_edge"]),
            patch_size=int(d.get("patch_size", defaults.patch_size)),
            merge_size=int(d.get("merge_size", defaults.merge_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", defaults.temporal_patch_size)),
            image_mean=tuple(float(x) for x in d.get("image_mean", defaults.image_mean)),
            image_std=tuple(float(x) for x in d.get("image_std", defaults.image_std)),
            rescale_factor=float(d.get("rescale_factor", defaults.rescale_factor)),
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor`` with min_pixels <= h*w <= max_pixels.

    Round each side to the nearest multiple; if that is too large shrink both by
    ``beta = sqrt(h*w / max_pixels)`` rounding down (at least one factor), if too small grow by
    ``beta = sqrt(min_pixels / (h*w))`` rounding up. Aspect ratios above 200 are rejected.
    (Python's ``round`` is round-half-to-even, as in HF.)
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid_thw(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of an image of the given original size (no decoding needed)."""
    rh, rw = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, rh // cfg.patch_size, rw // cfg.patch_size


def num_patches(grid_thw: Sequence[int]) -> int:
    """Patch rows of an image: t * h * w."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w


def num_image_tokens(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Merged vision tokens (= ``<|image_pad|>`` count) of an image: t*h*w / merge_size**2."""
    return num_patches(grid_thw) // (merge_size * merge_size)


# EXIF orientations (tag 0x0112) whose transform transposes the image (sides swap).
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file as :func:`load_image` returns it (after its EXIF
    orientation), from the header: no pixels are decoded."""
    from PIL import Image

    with Image.open(storage.path_or_file(path)) as im:
        w, h = im.size
        orientation = _header_orientation(im)
    return (w, h) if orientation in _TRANSPOSING_ORIENTATIONS else (h, w)


def _header_orientation(im) -> int:
    """The EXIF orientation ``PIL.ImageOps.exif_transpose`` will apply, without decoding.

    The base ``Image.getexif`` reads what the header holds (EXIF, XMP, a TIFF's tags); PNG's
    override decodes the image first, to reach an ``eXIf`` chunk written after the image
    data, so for a PNG without header EXIF the chunk list is scanned instead.
    """
    from PIL import Image

    exif = Image.Image.getexif(im)
    if _EXIF_ORIENTATION not in exif and im.format == "PNG" and "exif" not in im.info:
        data = _png_trailing_exif(im.fp)
        if data is not None:
            exif = Image.Exif()
            exif.load(b"Exif\x00\x00" + data)
    try:
        return int(exif.get(_EXIF_ORIENTATION, 1))
    except (TypeError, ValueError):
        return 1


def _png_trailing_exif(fp) -> bytes | None:
    """The payload of a PNG's ``eXIf`` chunk, found by seeking over chunks (not decoding)."""
    fp.seek(8)  # the signature
    while True:
        head = fp.read(8)
        if len(head) < 8:
            return None
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind == b"eXIf":
            return fp.read(length)
        if kind == b"IEND":
            return None
        fp.seek(length + 4, os.SEEK_CUR)  # data and CRC


def to_rgb(image) -> "Any":
    """A PIL RGB image; transparency (alpha band or ``transparency`` info) goes onto white."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str):
    """Opens an image file, applies its EXIF orientation (as HF's ``load_image``) and converts
    it to RGB (fully decoded, file closed)."""
    from PIL import Image, ImageOps

    with Image.open(storage.path_or_file(path)) as im:
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


def patchify(image_chw: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``[C, H, W]`` float32 -> (``[gh*gw, C*T*p*p]`` patches, ``(1, gh, gw)``), HF's order."""
    c, h, w = image_chw.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = image_chw.reshape(c, gh // m, m, p, gw // m, m, p)
    # -> (gh/m, gw/m, m_row, m_col, C, p_row, p_col)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)
    # repeat the single frame T times between C and the pixel axes: (..., C, T, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p), dtype=np.float32), (1, gh, gw)


def preprocess_image(image, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image (PIL or HxWxC uint8 array) -> (patches ``[t*h*w, patch_dim]`` float32, grid_thw)."""
    from PIL import Image

    rgb = to_rgb(image)
    width, height = rgb.size
    rh, rw = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    # PIL's resize always runs (a same-size bicubic resize is an exact copy).
    resized = rgb.resize((rw, rh), resample=Image.Resampling.BICUBIC)
    x = np.asarray(resized).transpose(2, 0, 1)  # [3, H, W] uint8
    x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
    x = (x - mean) / std
    return patchify(x, cfg)


def preprocess_images(images: Sequence, cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (patches of all images concatenated ``[sum t*h*w, patch_dim]``, grids ``[n, 3]`` int32)."""
    patches, grids = [], []
    for image in images:
        pv, grid = preprocess_image(image, cfg)
        patches.append(pv)
        grids.append(grid)
    if not patches:
        return np.zeros((0, cfg.patch_dim), np.float32), np.zeros((0, 3), np.int32)
    return np.concatenate(patches, axis=0), np.asarray(grids, dtype=np.int32)


def special_token_id(tokenizer, token: str) -> int:
    """The id of a special token; a clear error if the tokenizer lacks it (or would split it)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk) or tokenizer.convert_ids_to_tokens(tid) != token:
        raise ValueError(
            f"tokenizer has no token {token!r}; add it (ILVR adds <|latent_pad|>, <|latent_start|>, "
            "<|latent_end|> as special tokens) and resize the embeddings"
        )
    if tokenizer.encode(token, add_special_tokens=False) != [tid]:
        raise ValueError(f"tokenizer does not treat {token!r} as one special token")
    return int(tid)


def expand_image_pads(ids: Sequence[int], image_pad_id: int, counts: Sequence[int]) -> list[int]:
    """Replaces the i-th ``image_pad_id`` in ``ids`` by ``counts[i]`` copies (in order)."""
    out: list[int] = []
    k = 0
    for t in ids:
        if t == image_pad_id:
            if k >= len(counts):
                raise ValueError(f"more image placeholders than images ({len(counts)})")
            out.extend([image_pad_id] * int(counts[k]))
            k += 1
        else:
            out.append(int(t))
    if k != len(counts):
        raise ValueError(f"{k} image placeholders for {len(counts)} images")
    return out


def user_messages(text_input: str, num_images: int) -> list[dict[str, Any]]:
    """The user turn as an HF content list.

    Without ``<image>`` in the text: all question images first, then the question text, the
    order Qwen2.5-VL's own examples use (``[{"type": "image"}, ..., {"type": "text"}]``).

    With placeholders: the text is split at each literal ``<image>`` and image i takes the
    place of the i-th placeholder (the placeholder itself is removed, the text around it is
    kept verbatim, whitespace included). This is the reference's ``place_input_image``, which
    renders the images-first template and then moves the vision blocks onto the placeholders:
    ``"a <image>\\nb"`` becomes ``"a <|vision_start|><|image_pad|><|vision_end|>\\nb"``.
    The placeholder count must equal ``num_images`` (``ValueError`` otherwise: the reference
    would fail on the image-token count).

    The chat template renders each image as ``<|vision_start|><|image_pad|><|vision_end|>`` in
    place and each text item verbatim.
    """
    n_placeholders = text_input.count(IMAGE_PLACEHOLDER)
    if n_placeholders == 0:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": text_input})
        return [{"role": "user", "content": content}]
    if n_placeholders != num_images:
        raise ValueError(
            f"text_input has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders for {num_images} question images"
        )
    parts = text_input.split(IMAGE_PLACEHOLDER)
    content = [{"type": "text", "text": parts[0]}] if parts[0] else []
    for part in parts[1:]:
        content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]


def build_prompt_text(tokenizer, text_input: str, num_images: int, *, add_generation_prompt: bool = True) -> str:
    """The chat-template prompt text (one ``<|image_pad|>`` per image, not yet expanded).

    The tokenizer's template inserts the default system prompt ("You are a helpful
    assistant.") since the conversation has none; with ``add_generation_prompt`` the text ends
    with ``<|im_start|>assistant\\n``.
    """
    return tokenizer.apply_chat_template(
        user_messages(text_input, num_images), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def build_prompt_ids(
    tokenizer,
    text_input: str,
    image_grid_thw: Sequence[Sequence[int]],
    *,
    merge_size: int = 2,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of the user prompt with image i expanded to ``t*h*w/merge_size**2`` image pads.

    Equals ``Qwen2_5_VLProcessor(text=apply_chat_template(...), images=...)["input_ids"]``.
    """
    text = build_prompt_text(tokenizer, text_input, len(image_grid_thw), add_generation_prompt=add_generation_prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pad_id = special_token_id(tokenizer, IMAGE_PAD)
    return expand_image_pads(ids, pad_id, [num_image_tokens(g, merge_size) for g in image_grid_thw])
