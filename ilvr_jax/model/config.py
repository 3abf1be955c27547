"""Qwen2.5-VL architecture configuration.

Read from an HF directory through transformers' own ``Qwen2_5_VLConfig`` so that both
``config.json`` layouts (flat 4.4x fields with ``rope_scaling``; nested ``text_config`` with
``rope_parameters`` from transformers 5) give the same result. Plain frozen dataclasses so
the configs are hashable and can be static arguments of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

LATENT_TOKENS = ("<|latent_pad|>", "<|latent_start|>", "<|latent_end|>")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Whole Qwen2.5-VL: vision tower, language model and the special token ids."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    # Latent-token ids (ILVR). The model itself treats them as ordinary tokens; they are
    # recorded here so that an exported config.json carries them.
    latent_pad_token_id: int | None = None
    latent_start_token_id: int | None = None
    latent_end_token_id: int | None = None
    latent_size: int | None = None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, path_or_config: Any) -> "ModelConfig":
        """From an HF model directory, a config.json path, a dict or a ``Qwen2_5_VLConfig``."""
        from transformers import Qwen2_5_VLConfig

        raw: dict[str, Any] = {}
        if isinstance(path_or_config, (str, os.PathLike)):
            path = os.fspath(path_or_config)
            cfg_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
            if not os.path.isfile(cfg_file):
                raise FileNotFoundError(f"{cfg_file}: no config.json (not an HF model directory)")
            with open(cfg_file) as f:
                try:
                    raw = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
            if raw.get("model_type") != "qwen2_5_vl":
                raise ValueError(
                    f"{cfg_file}: model_type is {raw.get('model_type')!r}, expected 'qwen2_5_vl' "
                    "(this is not a Qwen2.5-VL checkpoint)"
                )
            hf = Qwen2_5_VLConfig.from_dict(raw)
        elif isinstance(path_or_config, dict):
            raw = dict(path_or_config)
            hf = Qwen2_5_VLConfig.from_dict(raw)
        else:
            hf = path_or_config
            raw = hf.to_dict()

        v = hf.vision_config
        t = hf.text_config
        v_rope = getattr(v, "rope_parameters", None) or {}
        t_rope = getattr(t, "rope_parameters", None) or {}
        mrope = t_rope.get("mrope_section")
        if mrope is None:
            raise ValueError("config has no mrope_section in rope_scaling/rope_parameters")
        vision = VisionConfig(
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            in_channels=v.in_channels,
            patch_size=int(v.patch_size),
            temporal_patch_size=int(v.temporal_patch_size),
            spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size,
            out_hidden_size=v.out_hidden_size,
            fullatt_block_indexes=tuple(v.fullatt_block_indexes),
            rope_theta=float(v_rope.get("rope_theta", 10000.0)),
            hidden_act=v.hidden_act,
        )
        tie = bool(getattr(hf, "tie_word_embeddings", False) or getattr(t, "tie_word_embeddings", False))
        text = TextConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            rms_norm_eps=t.rms_norm_eps,
            rope_theta=float(t_rope.get("rope_theta", 1000000.0)),
            mrope_section=tuple(int(s) for s in mrope),
            hidden_act=t.hidden_act,
            tie_word_embeddings=tie,
        )
        for act, where in ((vision.hidden_act, "vision_config"), (text.hidden_act, "text_config")):
            if act != "silu":
                raise ValueError(f"{where}.hidden_act={act!r} is not supported (expected 'silu')")
        if sum(text.mrope_section) * 2 != text.head_dim:
            raise ValueError(
                f"mrope_section {text.mrope_section} does not cover head_dim {text.head_dim}"
            )
        eos = getattr(t, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return cls(
            vision=vision,
            text=text,
            image_token_id=hf.image_token_id,
            video_token_id=hf.video_token_id,
            vision_start_token_id=hf.vision_start_token_id,
            vision_end_token_id=hf.vision_end_token_id,
            bos_token_id=getattr(t, "bos_token_id", None),
            eos_token_id=eos,
            latent_pad_token_id=raw.get("latent_pad_token_id"),
            latent_start_token_id=raw.get("latent_start_token_id"),
            latent_end_token_id=raw.get("latent_end_token_id"),
            latent_size=raw.get("latent_size"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 style config.json dict that ``Qwen2_5_VLConfig`` reads back."""
        v, t = self.vision, self.text
        d: dict[str, Any] = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "hidden_act": v.hidden_act,
                "tokens_per_second": 2,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
            "text_config": {
                "model_type": "qwen2_5_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "rms_norm_eps": t.rms_norm_eps,
                "hidden_act": t.hidden_act,
                "tie_word_embeddings": t.tie_word_embeddings,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "rope_parameters": {
                    "rope_type": "default",
                    "mrope_section": list(t.mrope_section),
                    "rope_theta": t.rope_theta,
                },
            },
        }
        for k in ("latent_pad_token_id", "latent_start_token_id", "latent_end_token_id", "latent_size"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    def to_hub_dict(self, source: dict[str, Any] | None = None, dtype: str | None = None) -> dict[str, Any]:
        """config.json in the hub's layout, the one every transformers version reads (4.5x
        and 5.x): the text model's fields at the top level with ``rope_theta`` and
        ``rope_scaling = {"type": "mrope", "mrope_section": ...}``, the vision config nested.

        ``source`` (the config.json training started from) keeps every field this config
        does not own (``max_position_embeddings``, ``sliding_window``, ``vision_token_id``, ...;
        a transformers-5 nested ``text_config`` is flattened); ``dtype`` (e.g. "bfloat16") is
        written as ``torch_dtype`` and ``dtype``.
        """
        src = dict(source or {})
        text_src = src.pop("text_config", None) or {}
        d: dict[str, Any] = {}
        for k, v in text_src.items():
            if k not in ("rope_parameters", "rope_scaling", "model_type", "architectures"):
                d[k] = v
        d.update({k: v for k, v in src.items() if k != "rope_parameters"})
        ours = self.to_hf_dict()
        t = ours.pop("text_config")
        for k in ("model_type", "rope_parameters"):
            t.pop(k)
        vision = {**(src.get("vision_config") or {}), **ours.pop("vision_config")}
        d.update(ours)
        d.update(t)
        d["vision_config"] = vision
        d["rope_theta"] = self.text.rope_theta
        d["rope_scaling"] = {"type": "mrope", "mrope_section": list(self.text.mrope_section)}
        if dtype is not None:
            d["torch_dtype"] = d["dtype"] = dtype
        return d

