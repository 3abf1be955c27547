"""Shared helpers of the language-model parity tests: the HF torch reference model, the
HF -> parameter-tree conversion, and batches built with the tokenizer, chat template and
HF's image processor (HF layout and the per-sample layout of the JAX model)."""

from __future__ import annotations

import functools

import numpy as np

from ilvr_jax.model.config import ModelConfig


@functools.lru_cache(maxsize=None)
def hf_model(hf_dir: str):
    """The HF torch Qwen2.5-VL of a tiny directory, fp32, eval mode, eager attention."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dir, torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@functools.lru_cache(maxsize=None)
def jax_params(hf_dir: str):
    """(ModelConfig, params) of a tiny directory, through the checkpoint loader."""
    from ilvr_jax.checkpoint.hf import load_hf_params

    return load_hf_params(hf_dir)


@functools.lru_cache(maxsize=None)
def tokenizer(hf_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def random_image(height: int, width: int, seed: int):
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def build_batch(hf_dir: str, samples, padding_side: str = "left", extra_text: str = ""):
    """Tokenised chat prompts with images, in both layouts.

    samples: list of (image_sizes, text): image_sizes is a list of (height, width) pixels.
    Returns a dict with HF inputs (``hf``: input_ids, attention_mask, mm_token_type_ids,
    pixel_values [sum patches, patch_dim], image_grid_thw [n_images, 3]) and JAX inputs
    (input_ids, attention_mask, pixel_values [B, P, patch_dim], image_grid_thw [B, I, 3]).
    """
    import transformers

    tok = tokenizer(hf_dir)
    cfg = ModelConfig.from_hf(hf_dir)
    proc = transformers.Qwen2VLImageProcessorPil.from_pretrained(hf_dir)
    merge = cfg.vision.spatial_merge_size ** 2
    ids_list, pix_list, grid_list = [], [], []
    for i, (sizes, text) in enumerate(samples):
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": text}]
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True) + extra_text
        if sizes:
            out = proc(images=[random_image(h, w, seed=100 * i + j) for j, (h, w) in enumerate(sizes)],
                       return_tensors="np")
            pix, grid = out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)
        else:
            pix, grid = np.zeros((0, cfg.vision.patch_dim), np.float32), np.zeros((0, 3), np.int64)
        # Expand each <|image_pad|> to its merged-token count, as the processor does.
        parts = prompt.split("<|image_pad|>")
        prompt = parts[0]
        for j, part in enumerate(parts[1:]):
            prompt += "<|image_pad|>" * int(np.prod(grid[j]) // merge) + part
        ids_list.append(tok(prompt)["input_ids"])
        pix_list.append(pix)
        grid_list.append(grid)
    b = len(samples)
    s = max(len(x) for x in ids_list)
    input_ids = np.full((b, s), tok.pad_token_id, np.int32)
    mask = np.zeros((b, s), np.int32)
    for i, ids in enumerate(ids_list):
        sl = slice(s - len(ids), s) if padding_side == "left" else slice(0, len(ids))
        input_ids[i, sl] = ids
        mask[i, sl] = 1
    p = max(1, max(x.shape[0] for x in pix_list))
    n_img = max(1, max(x.shape[0] for x in grid_list))
    pixel_values = np.zeros((b, p, cfg.vision.patch_dim), np.float32)
    grid_thw = np.zeros((b, n_img, 3), np.int32)
    for i, (pix, grid) in enumerate(zip(pix_list, grid_list)):
        pixel_values[i, : pix.shape[0]] = pix
        grid_thw[i, : grid.shape[0]] = grid
    hf = dict(
        input_ids=input_ids.astype(np.int64),
        attention_mask=mask.astype(np.int64),
        mm_token_type_ids=(input_ids == cfg.image_token_id).astype(np.int64),
        pixel_values=np.concatenate(pix_list, 0),
        image_grid_thw=np.concatenate(grid_list, 0),
    )
    return dict(hf=hf, input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values,
                image_grid_thw=grid_thw, cfg=cfg)


def hf_forward(model, batch, **kw):
    """HF logits/hidden for a batch from :func:`build_batch` (M-RoPE via mm_token_type_ids)."""
    import torch

    hf = batch["hf"]
    args = dict(
        input_ids=torch.from_numpy(hf["input_ids"]),
        attention_mask=torch.from_numpy(hf["attention_mask"]),
        mm_token_type_ids=torch.from_numpy(hf["mm_token_type_ids"]),
        # An empty grid (text-only batch) still makes HF build positions with get_rope_index.
        image_grid_thw=torch.from_numpy(hf["image_grid_thw"]),
    )
    if hf["pixel_values"].shape[0]:
        args["pixel_values"] = torch.from_numpy(hf["pixel_values"])
    args.update(kw)
    model.model.rope_deltas = None
    with torch.no_grad():
        return model(**args, output_hidden_states=True)


# Batches exercised by the parity tests: name -> (samples, padding side).
BATCHES = {
    "text_only": ([((), "what is the map"), ((), "move left then up and reach the goal ?")], "left"),
    "one_image": ([([(56, 84)], "where is the hole")], "left"),
    "mixed_left": ([
        ([(56, 84), (112, 56)], "which picture shows the goal"),
        ([(84, 84)], "count the red squares"),
        ((), "is the ice safe"),
    ], "left"),
    "mixed_right": ([
        ([(84, 56)], "move up"),
        ([(56, 112), (56, 56)], "first second which one has the hole ? think step by step"),
    ], "right"),
}
