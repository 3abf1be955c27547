"""An analytic model of the per-device memory of one training step: what the fit check
reports for GPU presets (no AOT compiler for them on a CPU host) and a cross-check of the
TPU compiler's numbers."""

from __future__ import annotations

def analytic_memory(c, cfg, mesh_shape, trainable_bytes: int, state_info: dict) -> dict:
    """Per-device bytes of one step, estimated (what the GPU report prints, and a cross-check
    of the compiler on TPUs). With b = micro-batch per device, S = max_length, T = b S,
    a = bytes of the compute dtype, t = the tensor axis, P_q / P_h = patch rows per sample:

      state       the exact shard sizes of params + teacher + AdamW moments
      grads       2 x trainable fp32 / devices (the accumulator and one micro-batch's)
      batch       the exact shard sizes of the batch
      saved       L T a x (D per layer for nothing_saveable/full; D + (Hq + 2 Hkv) hd / t + 2 D
                  + 2 I / t for the dots policies; the whole layer for none)
      layer       one layer's forward + backward working set: 2 a T (3 D + (2 Hq + 2 Hkv) hd / t
                  + 3 I / t), plus scores b Hq/t S^2 (4 + a) x 2 with XLA attention (0 with cudnn)
      logits      C V / t (4 + 4 + a) with C = b x model.ce_chunk tokens (the chunked CE keeps one
                  chunk's fp32 logits, their gradient and the matmul output; C = T without chunks)
      vision      b x one frozen block over P = max(P_q, P_h in stage 1) rows: a P (4 d_v
                  + 2 i_v) + scores heads_v min(P, 1024) P (4 + a) (a full-attention block's
                  query chunk; windowed blocks attend within a 3-window band, less)
      teacher     stage 1: forward only, one layer's half working set + fp32 hidden T D 4
      recurrence  stage 2: 2 (M K + M + 1) KV caches of b L 2 (S + 1) Hkv hd a bytes, the
                  scan carry kept for the backward at every latent step and text chunk

    peak = state + grads + batch + max(saved + recurrence + layer + logits, vision, teacher).
    A first-order model: against libtpu's compiles of the 7B presets it is high for stage 1
    and low for stage 2 (benchmarks/aot_fit.py prints both)."""
    from ilvr_jax.model.vision import FULL_ATTENTION_QUERY_CHUNK

    t, v = cfg.text, cfg.vision
    dp, fsdp, tp = mesh_shape
    devices = dp * fsdp * tp
    b = max(int(c.data.batch_size) // int(c.optim.grad_accum_steps) // (dp * fsdp), 1)
    S = int(c.data.max_length)
    T = b * S
    a = 2 if c.model.compute_dtype == "bfloat16" else 4
    D, I, L, hd = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.head_dim
    hq, hkv = t.num_attention_heads, t.num_key_value_heads
    per_layer = {"nothing_saveable": D, "full": D,
                 "dots_saveable": D + (hq + 2 * hkv) * hd // tp + 2 * D + 2 * I // tp}
    per_layer["dots_with_no_batch_dims_saveable"] = per_layer["dots_saveable"]
    scores = 0 if c.model.attn_impl in ("cudnn", "splash") else 2 * b * (hq // tp) * S * S * (4 + a)
    layer = 2 * a * T * (3 * D + (2 * hq + 2 * hkv) * hd // tp + 3 * I // tp) + scores
    saved = L * (layer if c.model.remat_policy == "none" else a * T * per_layer[c.model.remat_policy])
    chunk = b * int(c.model.ce_chunk) if int(c.model.ce_chunk) > 0 else T
    logits = min(chunk, T) * (t.vocab_size // tp) * (8 + a)
    # Question and helper images go through separate tower calls: the larger one counts.
    patches = max(int(c.data.max_question_patches), int(c.data.max_helper_patches) if c.stage == 1 else 0)
    vision = b * (a * patches * (4 * v.hidden_size + 2 * v.intermediate_size)
                  + v.num_heads * min(patches, FULL_ATTENTION_QUERY_CHUNK) * patches * (4 + a))
    teacher = (layer // 2 + 4 * T * D) if c.stage == 1 else 0
    # Stage 2's latent recurrence scans K one-token steps per segment (and M + 1 text chunks)
    # with the whole KV cache as the carry: its backward keeps the cache of every step.
    M, K = int(c.data.max_segments), int(c.ilvr.latent_size)
    cache = b * L * 2 * (S + 1) * (hkv // tp if hkv % tp == 0 else hkv) * hd * a
    recurrence = 2 * (M * K + M + 1) * cache if c.stage == 2 else 0
    fixed = state_info["state_bytes_per_device"] + 2 * trainable_bytes // devices + state_info["batch_bytes_per_device"]
    parts = dict(saved=saved, layer=layer, logits=logits, vision=vision, teacher=teacher, recurrence=recurrence)
    return dict(estimate_parts=parts,
                estimated_peak_bytes=int(fixed + max(saved + recurrence + layer + logits, vision, teacher)))
