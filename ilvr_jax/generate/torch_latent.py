"""Greedy latent-mode generation on an exported HF directory, with stock PyTorch transformers.

A check of an export that needs nothing of JAX: the exported directory is loaded as an
ordinary ``Qwen2_5_VLForConditionalGeneration`` and decoded one sample at a time. torch is an
optional dependency of the package, so it is imported inside the functions only.

Decoding (the same rules as the JAX generation):

* The prompt is built by the training code (``data.processor.build_prompt_ids`` and its image
  preprocessing), so evaluation sees exactly the prompts training saw.
* Greedy decoding with a KV cache. In text mode the next token is the argmax. When it is
  ``<|latent_start|>`` the next K steps (K = ``latent_size`` of config.json) record
  ``<|latent_pad|>`` and feed, as ``inputs_embeds``, the final-norm last-layer hidden state of
  the previous step (for the first pad: the ``<|latent_start|>`` position); then
  ``<|latent_end|>`` is forced and fed as a token. With ``latent_end_early`` an argmax of
  ``<|latent_end|>`` at a pad step ends the span there.
* Every start / pad / end token takes the next 1-D text position: M-RoPE index = number of
  tokens so far + the sample's rope delta, on all three axes. Positions are passed explicitly
  (prefill: HF's own ``get_rope_index``), because how HF infers them during cached decoding
  differs between transformers 4.5x and 5.x (and 5.x needs ``mm_token_type_ids``).
* Decoding stops after an EOS / ``<|im_end|>`` chosen in text mode, or at ``max_new_tokens``
  generated tokens (latent tokens included).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ilvr_jax.data.processor import (
    ImageProcessorConfig,
    build_prompt_ids,
    load_image,
    preprocess_images,
    special_token_id,
)

LATENT_PAD, LATENT_START, LATENT_END = "<|latent_pad|>", "<|latent_start|>", "<|latent_end|>"
TURN_END = "<|im_end|>"


@dataclasses.dataclass
class LatentGeneration:
    """One generated reply: ``token_ids`` (generated only, the stop token included), its
    decoded ``text`` (special tokens kept), the vectors fed at the latent pads
    (``latents`` [n, hidden] float32) and the index of each pad in ``token_ids``."""

    token_ids: list[int]
    text: str
    latents: np.ndarray
    latent_positions: list[int]


@dataclasses.dataclass(frozen=True)
class LatentTokens:
    start: int
    pad: int
    end: int
    size: int


def latent_tokens(config: Any, tokenizer: Any, latent_size: int | None = None) -> LatentTokens:
    """Latent token ids and K: from the model config (an export records ``latent_*_token_id``
    and ``latent_size``), ids falling back to the tokenizer's tokens; ``latent_size`` overrides K."""
    ids = {}
    for name, token in (("start", LATENT_START), ("pad", LATENT_PAD), ("end", LATENT_END)):
        tid = getattr(config, f"latent_{name}_token_id", None)
        ids[name] = int(tid) if tid is not None else special_token_id(tokenizer, token)
    size = latent_size if latent_size is not None else getattr(config, "latent_size", None)
    if size is None:
        raise ValueError("config.json has no latent_size (not an ILVR export?); pass latent_size=K")
    if int(size) < 0:
        raise ValueError(f"latent_size must be >= 0, got {size}")
    return LatentTokens(size=int(size), **ids)


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids of the generation config and the tokenizer, plus ``<|im_end|>``."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for eos in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    im_end = tokenizer.convert_tokens_to_ids(TURN_END)
    if isinstance(im_end, int) and im_end != getattr(tokenizer, "unk_token_id", None):
        ids.add(im_end)
    return frozenset(ids)


def load_export(hf_dir: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu",
                attn_implementation: str = "eager"):
    """(model, tokenizer, image processor config) of an HF directory; weights from
    safetensors only (``use_safetensors=True``: nothing is unpickled)."""
    import torch
    import transformers

    hf_dir = os.fspath(hf_dir)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"{hf_dir}: no config.json (not an HF model directory)")
    torch_dtype = getattr(torch, dtype)
    # ``dtype`` since transformers 4.56; ``torch_dtype`` (deprecated there) before.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dir, use_safetensors=True, attn_implementation=attn_implementation, **{dtype_kw: torch_dtype})
    model = model.to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    has_proc = os.path.isfile(os.path.join(hf_dir, "preprocessor_config.json"))
    image_config = ImageProcessorConfig.from_hf(hf_dir) if has_proc else ImageProcessorConfig()
    return model, tokenizer, image_config


def prompt_inputs(tokenizer: Any, text_input: str, images: Sequence, image_config: ImageProcessorConfig):
    """(prompt ids, pixel patches [P, patch_dim], grids [n, 3]) exactly as training builds them."""
    pixel_values, grids = preprocess_images(list(images), image_config)
    ids = build_prompt_ids(tokenizer, text_input, grids.tolist(), merge_size=image_config.merge_size)
    return ids, pixel_values, grids


class _Decoder:
    """One sample's cached forward passes with explicit M-RoPE positions."""

    def __init__(self, model: Any):
        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x names the cache argument ``cache`` (``past_key_values`` before).
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        # 5.x's forward takes ``mm_token_type_ids`` (its processor returns it), 4.5x's does not;
        # the positions are explicit either way.
        self.takes_mm_types = "mm_token_type_ids" in params
        self.cache = None
        self.length = 0
        self.delta = 0

    def _run(self, positions, **inputs):
        import torch

        mask = torch.ones((1, self.length + positions.shape[-1]), dtype=torch.long, device=positions.device)
        out = self.model(**inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                         output_hidden_states=True, return_dict=True, **{self.cache_kw: self.cache})
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values
        self.length += positions.shape[-1]
        # hidden_states[-1] is the last layer after the final norm: what lm_head reads.
        return out.logits[0, -1], out.hidden_states[-1][0, -1]

    def prefill(self, prompt_ids: Sequence[int], pixel_values: np.ndarray, grids: np.ndarray):
        import torch

        dev = self.model.device
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=dev)
        inputs: dict[str, Any] = {"input_ids": ids}
        if len(grids):
            grid_t = torch.from_numpy(np.asarray(grids, np.int64)).to(dev)
            mm_types = (ids == int(self.model.config.image_token_id)).long()
            rope_index = getattr(getattr(self.model, "model", None), "get_rope_index", None)
            rope_index = rope_index or self.model.get_rope_index
            kw: dict[str, Any] = {"image_grid_thw": grid_t, "attention_mask": torch.ones_like(ids)}
            if "mm_token_type_ids" in inspect.signature(rope_index).parameters:
                kw["mm_token_type_ids"] = mm_types
            positions, delta = rope_index(ids, **kw)
            self.delta = int(delta.reshape(-1)[0])
            dtype = self.model.get_input_embeddings().weight.dtype
            inputs.update(pixel_values=torch.from_numpy(np.asarray(pixel_values, np.float32)).to(dev, dtype),
                          image_grid_thw=grid_t)
            if self.takes_mm_types:
                inputs["mm_token_type_ids"] = mm_types
        else:
            positions = torch.arange(ids.shape[1], device=dev).view(1, 1, -1).expand(3, 1, -1)
            self.delta = 0
        return self._run(positions.to(dev), **inputs)

    def step(self, token: int | None = None, embedding=None):
        """Feeds one token id, or one input embedding (a latent), at the next text position."""
        import torch

        dev = self.model.device
        positions = torch.full((3, 1, 1), self.length + self.delta, dtype=torch.long, device=dev)
        if embedding is not None:
            return self._run(positions, inputs_embeds=embedding.view(1, 1, -1))
        return self._run(positions, input_ids=torch.tensor([[token]], dtype=torch.long, device=dev))


def generate_latent(
    model: Any,
    tokenizer: Any,
    text_input: str,
    images: Sequence = (),
    *,
    image_config: ImageProcessorConfig | None = None,
    **kwargs: Any,
) -> LatentGeneration:
    """Greedy latent-mode generation for one question (see the module doc for the rules).

    ``images``: the question images (PIL images or HxWx3 uint8 arrays) in record order;
    ``kwargs``: those of :func:`generate_from_prompt`.
    """
    prompt_ids, pixel_values, grids = prompt_inputs(tokenizer, text_input, images,
                                                    image_config or ImageProcessorConfig())
    return generate_from_prompt(model, tokenizer, prompt_ids, pixel_values, grids, **kwargs)


def generate_from_prompt(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    *,
    max_new_tokens: int = 4096,
    latent_end_early: bool = False,
    latent_size: int | None = None,
    stop_ids: Iterable[int] | None = None,
) -> LatentGeneration:
    """Greedy latent-mode generation from prompt ids already built (``prompt_inputs``, or
    the JAX side's ``generate.prompts.record_prompt``: the same ids and patches), with the
    question images' patches [P, patch_dim] and grids [n, 3]."""
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lt = latent_tokens(model.config, tokenizer, latent_size)
    stops = frozenset(stop_ids) if stop_ids is not None else stop_token_ids(model, tokenizer)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
    if len(grids) and pixel_values is None:
        raise ValueError(f"{len(grids)} image grids but no pixel_values")

    decoder = _Decoder(model)
    generated: list[int] = []
    latents: list[np.ndarray] = []
    latent_positions: list[int] = []
    in_span, pads = False, 0
    with torch.inference_mode():
        logits, hidden = decoder.prefill(list(prompt_ids), pixel_values, grids)
        while True:
            feed = None
            if in_span:
                ends_early = latent_end_early and int(torch.argmax(logits)) == lt.end
                if pads < lt.size and not ends_early:
                    token, feed = lt.pad, hidden
                    latent_positions.append(len(generated))
                    latents.append(hidden.float().cpu().numpy())
                    pads += 1
                else:
                    token, in_span = lt.end, False
            else:
                token = int(torch.argmax(logits))
                if token == lt.start:
                    in_span, pads = True, 0
            generated.append(token)
            if (feed is None and token in stops) or len(generated) >= max_new_tokens:
                break
            logits, hidden = decoder.step(token=None if feed is not None else token, embedding=feed)

    hidden_size = int(hidden.shape[-1])
    return LatentGeneration(
        token_ids=generated,
        text=tokenizer.decode(generated, skip_special_tokens=False),
        latents=np.stack(latents).astype(np.float32) if latents else np.zeros((0, hidden_size), np.float32),
        latent_positions=latent_positions,
    )


def generate_records(
    model_or_dir: Any,
    records: Iterable[Mapping[str, Any]],
    *,
    tokenizer: Any = None,
    image_config: ImageProcessorConfig | None = None,
    **kwargs: Any,
) -> list[LatentGeneration]:
    """``generate_latent`` for each canonical record (``text_input``, ``image_input`` with
    absolute paths, as the adapters yield them), one at a time. ``model_or_dir`` is a loaded
    model (then ``tokenizer`` is required) or an exported HF directory."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        model, tok, cfg = load_export(model_or_dir)
        tokenizer = tokenizer or tok
        image_config = image_config or cfg
    else:
        model = model_or_dir
        if tokenizer is None:
            raise ValueError("generate_records: a loaded model needs its tokenizer (tokenizer=...)")
    results = []
    for i, rec in enumerate(records):
        where = f"record {rec.get('id', i)!r}"
        text = rec.get("text_input")
        if not isinstance(text, str):
            raise ValueError(f"{where}: text_input must be a string, got {type(text).__name__}")
        paths = rec.get("image_input") or []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"{where}: image_input must be a list of image paths")
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{where}: question image {p!r} does not exist")
        images = [load_image(p) for p in paths]
        results.append(generate_latent(model, tokenizer, text, images, image_config=image_config, **kwargs))
    return results
