"""Batched, compiled generation with ILVR's latent mode (method section 6).

``generate_records`` (records -> generations) builds prompts with the training code,
``sampler`` holds the prefill and the ``while_loop`` decode, ``sampling`` the token choice;
the per-row latent rules live in ``ilvr_jax.ilvr.latent_decoding``.
"""

from ilvr_jax.generate.generation import (Generation, decode_config, generate_jsonl, generate_prompts,
                                          generate_records, stop_token_ids, unpack)
from ilvr_jax.generate.prompts import Prompt, latent_token_ids, record_prompt
from ilvr_jax.generate.sampler import (DecodeConfig, DecodeOutput, PromptBatch, bucket, decode_loop,
                                       generate_batch, pad_prompts, prefill)
from ilvr_jax.generate.sampling import SamplingParams, choose_tokens, filter_logits

__all__ = [
    "DecodeConfig", "DecodeOutput", "Generation", "Prompt", "PromptBatch", "SamplingParams", "bucket",
    "choose_tokens", "decode_config", "decode_loop", "filter_logits", "generate_batch", "generate_jsonl",
    "generate_prompts",
    "generate_records", "latent_token_ids", "pad_prompts", "prefill", "record_prompt", "stop_token_ids", "unpack",
]
