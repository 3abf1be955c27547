"""ILVR maths over arrays: user summary and segment text means, helper-image candidates and
selective top-p/top-k targets, stage-1 losses with teacher forcing (and the chunked CE), the
teacher EMA, and the decode loop's latent-mode rules and latent ablations."""

from ilvr_jax.ilvr.latent_ablation import ABLATIONS, ablate_fed_latents
from ilvr_jax.ilvr.latent_decoding import LatentIds, LatentStep, initial_span_left, latent_step
from ilvr_jax.ilvr.losses import (IGNORE_INDEX, alignment_noise, latent_alignment_loss,
                                  latent_positions, mean_over_samples, next_token_ce,
                                  next_token_ce_chunked, next_token_ce_per_sample, teacher_forcing_embeds)
from ilvr_jax.ilvr.query import (SpecialTokens, grouped_mean_weights, image_rows, prompt_masks,
                                 segment_text_masks, segment_text_means, user_summary)
from ilvr_jax.ilvr.selection import (Selection, cosine_similarity, helper_token_counts,
                                     pool_candidates, select_helper_patches, validate_segments)
from ilvr_jax.ilvr.target_baselines import TARGET_SELECTIONS, mean_pooled_targets, random_helper_patches
from ilvr_jax.ilvr.teacher import ema_update

__all__ = [
    "ABLATIONS", "LatentIds", "LatentStep", "ablate_fed_latents", "initial_span_left", "latent_step",
    "next_token_ce_chunked", "TARGET_SELECTIONS", "mean_pooled_targets", "random_helper_patches",
    "IGNORE_INDEX", "Selection", "SpecialTokens", "alignment_noise", "cosine_similarity",
    "ema_update", "grouped_mean_weights", "helper_token_counts", "image_rows", "latent_alignment_loss",
    "latent_positions", "mean_over_samples", "next_token_ce", "next_token_ce_per_sample",
    "pool_candidates", "prompt_masks", "segment_text_masks", "segment_text_means",
    "select_helper_patches", "teacher_forcing_embeds", "user_summary", "validate_segments",
]
