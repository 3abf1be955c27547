"""A tiny Qwen2.5-VL directory laid out exactly like a Hugging Face hub download.

Written file by file with ``tokenizers``, ``safetensors`` and torch, independently of the
package's own writers, so the tests that start from it take the path a user takes with a
downloaded ``Qwen/Qwen2.5-VL-7B-Instruct``:

* ``config.json`` in the transformers 4.4x flat layout (text fields at the top level,
  ``rope_scaling = {"type": "mrope", "mrope_section": ...}``, ``rope_theta``,
  ``torch_dtype: bfloat16``, ``max_position_embeddings: 128000``, ``vision_token_id``,
  ``in_chans`` in the vision config);
* an embedding table padded above the tokenizer length (as 152064 > 151665);
* bf16 weights with the hub's tensor names (``model.layers.*``, ``visual.*``, ``lm_head``)
  in several ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``;
* ``tokenizer.json``, ``vocab.json``, ``merges.txt`` and a 4.4x-style ``tokenizer_config.json``
  (``added_tokens_decoder``, ``Qwen2Tokenizer``) WITHOUT the ILVR latent tokens;
* ``chat_template.json``, ``preprocessor_config.json`` (top-level ``min_pixels`` /
  ``max_pixels``, no ``size``), ``generation_config.json``.

Load with :func:`load` (test modules are imported with ``--import-mode=importlib``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys

# Qwen2.5's 22 added tokens in the hub's order; the last 8 are not "special".
ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = ("the a is of to in on and or not move up down left right start goal hole safe map grid cell "
         "row column step path answer question image look think final option A B C D which what red "
         "green blue square circle agent reach avoid after before then first last one two three four "
         "0 1 2 3 4 5 6 7 8 9 boxed , . : ? ( ) { } \\ helpful assistant system user").split()
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, mrope_section=[2, 3, 3])
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
              fullatt_block_indexes=[1], window_size=56)
PADDED_VOCAB = 512          # the table's rows; the tokenizer has fewer (as 152064 > 151665)


def load():
    name = "ilvr_hub_download"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.abspath(__file__))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def _tokenizer_files(out_dir: str) -> dict[str, int]:
    """tokenizer.json + vocab.json + merges.txt + tokenizer_config.json; returns the added
    tokens' ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(1)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))) for _ in range(1500)]
    corpus.append("".join(chr(c) for c in range(32, 127)))
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=360, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
        show_progress=False))
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    tok.model.save(out_dir)            # vocab.json, merges.txt (the slow tokenizer's files)
    ids = {t: tok.token_to_id(t) for t, _ in ADDED_TOKENS}
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": s} for t, s in ADDED_TOKENS},
        "additional_special_tokens": [t for t, _ in ADDED_TOKENS[1:14]],
        "bos_token": None,
        "chat_template": _chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    return ids


def _chat_template() -> str:
    from ilvr_jax.tiny import CHAT_TEMPLATE  # the Qwen2.5-VL-Instruct template string (data)

    return CHAT_TEMPLATE


def hub_config(ids: dict[str, int]) -> dict:
    """A config.json as the hub has it (written by transformers 4.4x)."""
    text = dict(TEXT)
    mrope = text.pop("mrope_section")
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        **text,
        "initializer_range": 0.02,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "model_type": "qwen2_5_vl",
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            **VISION,
            "hidden_act": "silu",
            "in_chans": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "vocab_size": PADDED_VOCAB,
    }


def _hub_name(name: str) -> str:
    """transformers-5 state-dict names -> the hub checkpoint's names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def build_hub_download(out_dir: str, seed: int = 0, num_shards: int = 3) -> str:
    """Writes the directory (see the module docstring) and returns its path."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    ids = _tokenizer_files(out_dir)
    cfg_dict = hub_config(ids)
    _write_json(os.path.join(out_dir, "config.json"), cfg_dict)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(cfg_dict)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_q" in name else 0.0))
            elif p.ndim >= 2:
                p.copy_(torch.randn_like(p) * 0.05)
    state = {_hub_name(k): v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    per = -(-len(names) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        part = {k: state[k] for k in names[i * per:(i + 1) * per]}
        shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(part, os.path.join(out_dir, shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(out_dir, "chat_template.json"), {"chat_template": _chat_template()})
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    })
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.37.0",
    })
    return out_dir


def write_comt_records(out_dir: str, n: int = 8, seed: int = 0) -> str:
    """CoMT-style records as a user has them: a JSONL file beside an ``images/`` folder of
    JPEG and PNG files of assorted sizes; question images at ``<image>`` placeholders or
    not; one to three helper images each. Returns the JSONL path."""
    from PIL import Image

    rng = random.Random(seed)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)

    def image(name: str) -> str:
        w, h = rng.choice([(60, 60), (90, 50), (40, 120), (112, 84)])
        arr = bytes(rng.randrange(256) for _ in range(w * h * 3))
        ext = rng.choice(["jpg", "png"])
        Image.frombytes("RGB", (w, h), arr).save(os.path.join(img_dir, f"{name}.{ext}"))
        return f"images/{name}.{ext}"

    path = os.path.join(out_dir, "train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q = image(f"q{i}")
            letter = "ABCD"[i % 4]
            text = f"Which option is the red square after the move? A up B down C left D right"
            text_input = f"<image>\n{text}" if i % 2 else text
            plan = []
            for j in range(1 + i % 3):
                plan.append({"type": "text", "content": f"Step {j + 1}: look at the grid and move {rng.choice(WORDS)}."})
                plan.append({"type": "latent", "helper_image": image(f"h{i}_{j}")})
            plan.append({"type": "text", "content": f"The answer is \\boxed{{{letter}}}."})
            rec = {"id": f"comt-{i}", "text_input": text_input, "image_input": [q], "sequence_plan": plan,
                   "original_final_answer": letter}
            f.write(json.dumps(rec) + "\n")
    return path
