"""Tiny Qwen2.5-VL directories built locally: random weights, a small byte-level BPE tokenizer
that carries Qwen's chat/vision special tokens and the ILVR latent tokens, and the image
processor config. Saved as a normal HF directory, so everything downstream (conversion,
processor, training, export) runs exactly as it would on downloaded Qwen2.5-VL-7B weights.

Used by the tests and by the embedded demo; nothing here is downloaded.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

# Qwen2.5's special tokens, in Qwen's order (ids follow the regular vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
LATENT_TOKENS = ("<|latent_pad|>", "<|latent_start|>", "<|latent_end|>")

# Qwen2.5-VL-Instruct's chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_WORDS = (
    "the a an is are of to in on at from with and or not you your I we move moves moving "
    "up down left right start goal hole holes safe ice frozen lake grid map board cell row "
    "column step steps path answer question image picture look see think thought reasoning "
    "final option options A B C D which what where how many count shape shapes red green blue "
    "yellow black white square circle triangle puzzle maze agent reach reaches avoid fall "
    "player position after before then next first second third last each every one two three "
    "four five six seven eight nine zero 0 1 2 3 4 5 6 7 8 9 boxed L R U D , . : ; ? ! ( ) "
    "[ ] { } = + - * / \\ helpful assistant system user"
).split()


def _corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        k = rng.randint(3, 20)
        lines.append(" ".join(rng.choice(_CORPUS_WORDS) for _ in range(k)))
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines


def build_tokenizer(out_dir: str | None = None, vocab_size: int = 400, latent_tokens: bool = True):
    """A byte-level BPE tokenizer with Qwen2.5's pre-tokenizer and special tokens.

    Returns a ``transformers`` tokenizer (saved to ``out_dir`` when given). With
    ``latent_tokens`` the three ILVR tokens are added after Qwen's specials, as the
    reference adds them to the Qwen2.5 tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    # Qwen2's split pattern.
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    specials = list(QWEN_SPECIAL_TOKENS) + (list(LATENT_TOKENS) if latent_tokens else [])
    # Added in order, so ids follow the regular vocabulary as in Qwen2.5 (<|endoftext|> first).
    tok.add_special_tokens(specials)
    hf_tok = Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        hf_tok.save_pretrained(out_dir)
    return hf_tok


def image_processor_config(min_pixels: int = 4 * 28 * 28, max_pixels: int = 64 * 28 * 28) -> dict[str, Any]:
    """Qwen2.5-VL's ``preprocessor_config.json`` with a small pixel budget."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "merge_size": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }


# Architectures used by tests and the demo. Keys are fixture names.
TINY_SHAPES: dict[str, dict[str, Any]] = {
    # Untied head, GQA 4:2, two windowed + two full-attention vision blocks.
    "untied_gqa2": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3], vocab_size=512),
        vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[1, 3], window_size=56),
        tie=False,
    ),
    # Tied head, multi-query (GQA 4:1), all vision blocks windowed but the last.
    "tied_mqa": dict(
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, mrope_section=[2, 2, 2], vocab_size=512),
        vision=dict(depth=3, hidden_size=48, intermediate_size=80, num_heads=3, out_hidden_size=48,
                    fullatt_block_indexes=[2], window_size=112),
        tie=True,
    ),
    # No GQA (kv heads == q heads), every vision block full attention.
    "untied_mha_full": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, mrope_section=[2, 3, 3], vocab_size=512),
        vision=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32,
                    fullatt_block_indexes=[0, 1], window_size=112),
        tie=False,
    ),
}


def hf_config(tokenizer, shape: str = "untied_gqa2", vocab_size: int | None = None, latent_size: int = 4):
    """A ``Qwen2_5_VLConfig`` for one of ``TINY_SHAPES`` whose token ids match ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    spec = TINY_SHAPES[shape]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS + LATENT_TOKENS}
    text = dict(spec["text"])
    mrope = text.pop("mrope_section")
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            **text,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=spec["tie"],
        ),
        vision_config=dict(**spec["vision"], patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                           in_channels=3, tokens_per_second=2),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["tie"],
    )
    cfg.latent_pad_token_id = ids["<|latent_pad|>"]
    cfg.latent_start_token_id = ids["<|latent_start|>"]
    cfg.latent_end_token_id = ids["<|latent_end|>"]
    cfg.latent_size = latent_size
    return cfg


def build_tiny_model_dir(out_dir: str, shape: str = "untied_gqa2", seed: int = 0,
                         vocab_size: int | None = None, init_std: float = 0.05,
                         max_pixels: int = 64 * 28 * 28) -> str:
    """Writes a complete tiny Qwen2.5-VL HF directory (config, safetensors, tokenizer,
    processor) with random weights and returns its path."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(out_dir)
    cfg = hf_config(tok, shape, vocab_size=vocab_size)
    cfg.initializer_range = init_std
    cfg.text_config.initializer_range = init_std
    cfg.vision_config.initializer_range = init_std
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    # Random norm scales and biases too, so parity tests see every parameter's effect.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    model.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(image_processor_config(max_pixels=max_pixels), f, indent=2)
    with open(os.path.join(out_dir, "chat_template.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE}, f)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m ilvr_jax.tiny --out DIR``: a tiny random Qwen2.5-VL directory to try the
    commands on (needs torch, as the tests)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ilvr_jax.tiny", description=main.__doc__)
    ap.add_argument("--out", required=True, help="directory to write (config, safetensors, tokenizer, processor)")
    ap.add_argument("--shape", default="untied_gqa2", choices=sorted(TINY_SHAPES), help="architecture")
    ap.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = ap.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"error: {args.out}: already exists and is not empty", file=sys.stderr)
        return 2
    build_tiny_model_dir(args.out, args.shape, seed=args.seed)
    print(f"wrote {args.out}: a tiny Qwen2.5-VL ({args.shape}) with the latent tokens; train it with "
          f"--config.model.hf_dir={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
