"""Pictures of what the latents look at (the paper's Figure 3), drawn with PIL alone.

* :func:`latent_heatmaps`: for a record, generate (greedy, latent mode) and draw, for every
  question and helper image, the cosine of each fed latent with each of the image's patch
  features: the vision tower's merged output (``qwen25vl.image_features``, the LLM
  input-embedding space the latents live in). One PNG per image, one panel per latent, left
  to right; a panel is the image at the model's input resolution with each 28x28 merged
  patch tinted by its cosine (a black-red-yellow-white scale, per panel from its lowest to its
  highest cosine).
* :func:`selection_overlays`: for a training record, the momentum teacher's selection
  (``train.step.teacher_targets``: one teacher forward, then the top-p/top-k choice per
  segment) drawn over each helper image: the merged patches behind every selected candidate
  are tinted red (``SELECTED_RGB`` at ``SELECTED_ALPHA``), all others left as they are.

Merged patch k of an image with grid (1, h, w) covers rows ``2 * (k // (w / 2))`` .. +1 and
columns ``2 * (k % (w / 2))`` .. +1 of its 14 px patches: Qwen2.5-VL orders the patches so
that each 2x2 merge group is consecutive and the groups run in raster order, and the vision
tower restores that order after its window attention.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ilvr_jax import storage
from ilvr_jax.data import processor as proc
from ilvr_jax.data.records import RecordError, resolve_image_path
from ilvr_jax.evaluate.run import EvalItem, eval_items, shape_floors
from ilvr_jax.generate.sampler import bucket
from ilvr_jax.model import qwen25vl
from ilvr_jax.model.config import ModelConfig

SELECTED_RGB = (255, 0, 0)
SELECTED_ALPHA = 0.6
HEAT_ALPHA = 0.6


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "record"


def _pick(records, ids: Sequence[str] | None, limit: int | None, path: str | None) -> list[EvalItem]:
    items = eval_items(records, path=path)
    if ids is not None:
        known = {it.id for it in items}
        missing = [i for i in ids if i not in known]
        if missing:
            raise ValueError(f"{path or 'records'}: no record with id {', '.join(map(repr, missing))}")
        items = [it for it in items if it.id in set(ids)]
    return items[:limit] if limit is not None else items


def _load(path: str, where: str, what: str, loader: Callable[[str], Any]):
    try:
        return loader(path)
    except (OSError, ValueError, SyntaxError) as e:
        raise RecordError(where, "unreadable_image", f"cannot read {what} {path!r}: {e}") from None


def _model_view(image, image_cfg: proc.ImageProcessorConfig):
    """(the image at the model's input size as uint8 [H, W, 3], patches, grid (t, h, w))."""
    pv, grid = proc.preprocess_image(image, image_cfg)
    _, gh, gw = (int(x) for x in grid)
    from PIL import Image

    size = (gw * image_cfg.patch_size, gh * image_cfg.patch_size)
    rgb = proc.to_rgb(image).resize(size, resample=Image.Resampling.BICUBIC)  # as the processor resizes
    return np.asarray(rgb, np.uint8), pv, (1, gh, gw)


_features = jax.jit(qwen25vl.image_features, static_argnums=1)


def patch_features(params, cfg: ModelConfig, pixel_values: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Merged vision features [t*h*w/4, D] of one image."""
    n = pixel_values.shape[0]
    rows = max(4, -(-n // 4) * 4)
    pv = np.zeros((1, rows, pixel_values.shape[1]), np.float32)
    pv[0, :n] = pixel_values
    feats = _features(params, cfg, jnp.asarray(pv), jnp.asarray([[grid]], jnp.int32))
    return np.asarray(feats[0, : n // cfg.vision.merge_unit], np.float32)


def cell_boxes(grid: tuple[int, int, int], patch_size: int = 14,
               merge_size: int = 2) -> list[tuple[int, int, int, int]]:
    """Pixel box (left, top, right, bottom) of each merged patch, in feature order."""
    _, gh, gw = grid
    cell = patch_size * merge_size
    cols = gw // merge_size
    return [((k % cols) * cell, (k // cols) * cell, (k % cols + 1) * cell, (k // cols + 1) * cell)
            for k in range((gh // merge_size) * cols)]


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values -> RGB uint8 [n, 3] on a black-red-yellow-white scale from their min to max."""
    v = np.asarray(values, np.float64)
    span = v.max() - v.min() if v.size else 0.0
    x = (v - v.min()) / span if span > 0 else np.full_like(v, 0.5)
    r = np.clip(3 * x, 0, 1)
    g = np.clip(3 * x - 1, 0, 1)
    b = np.clip(3 * x - 2, 0, 1)
    return np.round(255 * np.stack([r, g, b], -1)).astype(np.uint8)


def tint(image: np.ndarray, boxes: Sequence[tuple[int, int, int, int]], colors: np.ndarray,
         alpha: float) -> np.ndarray:
    """A copy of ``image`` with box i blended towards colour i: (1 - alpha) * pixel + alpha * colour."""
    out = image.astype(np.float64).copy()
    for (x0, y0, x1, y1), c in zip(boxes, np.asarray(colors, np.float64)):
        out[y0:y1, x0:x1] = (1 - alpha) * out[y0:y1, x0:x1] + alpha * c
    return np.round(out).astype(np.uint8)


def _save(panels: Sequence[np.ndarray], path: str) -> str:
    from PIL import Image

    h = max(p.shape[0] for p in panels)
    canvas = np.zeros((h, sum(p.shape[1] for p in panels), 3), np.uint8)
    x = 0
    for p in panels:
        canvas[: p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1]
    png = io.BytesIO()   # rendered in memory, then written whole (locally or to a bucket)
    Image.fromarray(canvas).save(png, format="PNG")
    storage.makedirs(storage.dirname(path))
    storage.write_bytes(path, png.getvalue())
    return path


def _images_of(item: EvalItem) -> list[tuple[str, str]]:
    """(label, path) of the record's question images, then its helper images in plan order."""
    rec = item.record
    out = [(f"question_{i}", p) for i, p in enumerate(rec.get("image_input") or [])]
    helpers = [s["helper_image"] for s in rec.get("sequence_plan") or [] if s.get("type") == "latent"]
    out += [(f"helper_{m}", p) for m, p in enumerate(helpers)]
    return out


def latent_cosines(latents: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """cos(latent_i, feature_j) [N, P] in fp64."""
    a = np.asarray(latents, np.float64)
    b = np.asarray(feats, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


def latent_heatmaps(params, cfg: ModelConfig, tokenizer, image_cfg: proc.ImageProcessorConfig, records,
                    out_dir: str, *, ids: Sequence[str] | None = None, limit: int | None = None,
                    latent_size: int | None = None, max_new_tokens: int = 256, path: str | None = None,
                    image_loader: Callable[[str], Any] = proc.load_image) -> list[str]:
    """Writes ``out_dir/<id>/latents_<question_i|helper_m>.png`` (see module doc); returns the
    paths. A record whose generation feeds no latent gets no picture."""
    from ilvr_jax.generate.generation import generate_prompts
    from ilvr_jax.generate.prompts import record_prompt

    written = []
    items = _pick(records, ids, limit, path)
    # One compiled shape for all records (their custom loader's images have no headers to read).
    floors = shape_floors(items, tokenizer, image_cfg) if image_loader is proc.load_image else (16, 0, 1)
    for it in items:
        prompt = record_prompt(it.record, tokenizer, image_cfg, root=it.root, where=it.where,
                               image_loader=image_loader)
        (gen,) = generate_prompts(params, cfg, [prompt], tokenizer, batch_size=1, max_new_tokens=max_new_tokens,
                                  latent_size=latent_size, min_prompt_len=floors[0], min_patches=floors[1],
                                  min_images=floors[2])
        if not len(gen.latents):
            continue
        for label, p in _images_of(it):
            view, pv, grid = _model_view(_load(resolve_image_path(p, it.root), it.where, label, image_loader),
                                         image_cfg)
            cos = latent_cosines(gen.latents, patch_features(params, cfg, pv, grid))
            boxes = cell_boxes(grid, image_cfg.patch_size, image_cfg.merge_size)
            panels = [tint(view, boxes, heat_colors(row), HEAT_ALPHA) for row in cos]
            written.append(_save(panels, storage.join(out_dir, _safe_name(it.id), f"latents_{label}.png")))
    return written


def _single_batch(sample, patch_dim: int) -> dict[str, np.ndarray]:
    """One sample as a right-padded batch of one row (the training layout), every length
    rounded up to a power of two so that records share a few compiled shapes; absent images
    and segments are zero rows, as the input pipeline gives them."""
    def rows(x, minimum, fill=0):
        x = np.asarray(x)
        out = np.full((1, bucket(len(x), minimum)) + x.shape[1:], fill, x.dtype)
        out[0, : len(x)] = x
        return out

    ids = np.asarray(sample.input_ids, np.int32)
    return {
        "input_ids": rows(ids, 64, fill=int(ids[-1])), "attention_mask": rows(sample.attention_mask, 64),
        "labels": rows(sample.labels, 64, fill=-100),
        "pixel_values": rows(sample.pixel_values.reshape(-1, patch_dim).astype(np.float32), 4),
        "image_grid_thw": rows(sample.image_grid_thw.reshape(-1, 3).astype(np.int32), 1),
        "helper_pixel_values": rows(sample.helper_pixel_values.astype(np.float32), 64),
        "helper_grid_thw": rows(sample.helper_grid_thw.astype(np.int32), 8),
        "latent_starts": rows(sample.latent_starts.astype(np.int32), 8),
        "segment_mask": rows(sample.segment_mask.astype(bool), 8),
        "assistant_start": np.asarray([sample.assistant_start], np.int32),
        "sample_mask": np.ones((1,), bool),
    }


def candidate_cells(index: int, num_tokens: int, num_candidates: int) -> list[int]:
    """The merged patches behind candidate ``index`` (``ilvr.pool_candidates``: all tokens
    when fewer than L, else consecutive runs of P // L tokens, the tail dropped)."""
    if num_tokens < num_candidates:
        return [index]
    run = num_tokens // num_candidates
    return list(range(index * run, (index + 1) * run))


@functools.lru_cache(maxsize=None)
def _teacher_selector(scfg):
    """The teacher's selection (indices [1, M, K], K* [1, M]) of a batch, compiled once per
    step config."""
    from ilvr_jax.model import rope
    from ilvr_jax.train.step import teacher_targets

    cfg = scfg.model

    @jax.jit
    def select(p, batch):
        pos, _ = rope.mrope_position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], cfg)
        qf = qwen25vl.image_features(p, cfg, batch["pixel_values"], batch["image_grid_thw"])
        sel = teacher_targets(p, scfg, batch, qf, pos)
        return sel.indices, sel.kstar

    return select


def selection_overlays(params, cfg: ModelConfig, tokenizer, image_cfg: proc.ImageProcessorConfig, records,
                       out_dir: str, *, ids: Sequence[str] | None = None, limit: int | None = None,
                       latent_size: int | None = None, num_candidates: int = 256, top_p: float = 0.9,
                       path: str | None = None,
                       image_loader: Callable[[str], Any] = proc.load_image) -> list[str]:
    """Writes ``out_dir/<id>/selection_segment_<m>.png`` (see module doc) with ``params`` as
    the teacher; returns the paths."""
    # The teacher's selection is training's own code, read lazily for this picture only.
    from ilvr_jax.data import segments
    from ilvr_jax.train.step import StepConfig

    k = int(latent_size if latent_size is not None else cfg.latent_size or 0)
    if k < 1:
        raise ValueError("latent_size is neither given nor recorded in the model config (config.json latent_size)")
    select = _teacher_selector(StepConfig(model=cfg, stage=1, latent_size=k, num_candidates=num_candidates,
                                          top_p=top_p))
    fmt = segments.SequenceFormat(latent_size=k, merge_size=image_cfg.merge_size)

    written = []
    for it in _pick(records, ids, limit, path):
        sample = segments.build_sample(it.record, it.root, tokenizer, image_cfg, fmt, where=it.where,
                                       image_loader=image_loader)
        if not len(sample.helper_grid_thw):
            continue
        indices, kstar = jax.device_get(select(params, _single_batch(sample, cfg.vision.patch_dim)))
        helpers = [p for label, p in _images_of(it) if label.startswith("helper_")]
        for m, hp in enumerate(helpers):
            view, _, grid = _model_view(_load(resolve_image_path(hp, it.root), it.where, f"helper image {m}",
                                              image_loader), image_cfg)
            boxes = cell_boxes(grid, image_cfg.patch_size, image_cfg.merge_size)
            chosen = sorted({c for j in indices[0, m, : int(kstar[0, m])]
                             for c in candidate_cells(int(j), len(boxes), num_candidates)})
            panel = tint(view, [boxes[c] for c in chosen], np.tile(SELECTED_RGB, (len(chosen), 1)), SELECTED_ALPHA)
            written.append(_save([panel], storage.join(out_dir, _safe_name(it.id), f"selection_segment_{m}.png")))
    return written

