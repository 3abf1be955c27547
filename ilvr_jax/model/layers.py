"""Building blocks shared by the vision tower and the language model: RMSNorm, dense,
gated-SiLU MLP, the one attention function (and two segment-masked layouts of it whose memory
grows linearly with the sequence), and remat policies for scanned layers."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ilvr_jax.model import splash

Params = dict[str, Any]

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash", "reference")
# "auto": the implementation of the platform the step runs on.
PLATFORM_ATTENTION = {"tpu": "splash", "gpu": "cudnn", "cpu": "xla"}


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, then scale (as HF)."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + eps)).astype(dtype)
    return scale.astype(dtype) * y


def dense(x: jax.Array, p: Params, dtype=None) -> jax.Array:
    """``x @ kernel (+ bias)``; kernels are stored ``[in, out]``."""
    dtype = dtype or x.dtype
    y = jnp.einsum("...i,io->...o", x.astype(dtype), p["kernel"].astype(dtype))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def gated_mlp(x: jax.Array, p: Params, dtype=None) -> jax.Array:
    """down(silu(gate(x)) * up(x)), with or without biases (whatever ``p`` holds)."""
    return dense(jax.nn.silu(dense(x, p["gate_proj"], dtype)) * dense(x, p["up_proj"], dtype),
                 p["down_proj"], dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] over the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding ``x * cos + rotate_half(x) * sin`` in fp32, cast back to x's dtype
    (as HF). x: [B, S, H, D]; cos, sin: [B, S, D] (shared by all heads)."""
    x32 = x.astype(jnp.float32)
    y = x32 * cos[:, :, None, :] + rotate_half(x32) * sin[:, :, None, :]
    return y.astype(x.dtype)


def resolve_attention_impl(name: str | None, platform: str | None, compute_dtype=None) -> str:
    """The attention implementation for config value ``name`` on ``platform`` ("tpu",
    "gpu", "cpu"; "cuda" counts as "gpu"): "auto" picks splash on TPUs, cuDNN flash
    attention on GPUs (XLA when ``compute_dtype`` is given and is not bf16/fp16: cuDNN has
    no fp32 kernel) and XLA elsewhere; None is XLA (as everywhere in the model); any other
    name is returned as is after checking it is one of :data:`ATTENTION_IMPLEMENTATIONS`."""
    if name is None:
        return "xla"
    if name == "auto":
        platform = "gpu" if platform == "cuda" else platform  # cuDNN is NVIDIA's: rocm gets XLA
        impl = PLATFORM_ATTENTION.get(platform or "", "xla")
        if impl == "cudnn" and compute_dtype is not None and \
                jnp.dtype(compute_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            impl = "xla"
        return impl
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose from "
                         f"{('auto',) + ATTENTION_IMPLEMENTATIONS}")
    return name


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """An attention mask with its structure: query i attends to key j iff
    ``q_segment_ids[b, i] == kv_segment_ids[b, j]`` and, when ``causal``, j <= i.

    ``dense``: the caller's boolean mask broadcastable to [B, Hq, Sq, Sk], what every
    implementation but "splash" uses (when None, the mask the ids and the causal flag
    describe); the kernel uses the ids. The two must agree on every row the caller keeps
    (padding rows may differ: the kernel gives each padding query a row of its own).
    """

    q_segment_ids: jax.Array  # [B, Sq] int32
    kv_segment_ids: jax.Array  # [B, Sk] int32
    dense: jax.Array | None = None
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def as_dense(self) -> jax.Array:
        if self.dense is not None:
            return self.dense
        m = self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
        if self.causal:
            sq, sk = m.shape[1], m.shape[2]
            m = m & (jnp.arange(sk)[None, None, :] <= jnp.arange(sq)[None, :, None])
        return m[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | SegmentMask | None,
              implementation: str | None = None) -> jax.Array:
    """Scaled dot-product attention, the one place every attention goes through.

    q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D] with Hq a multiple of Hkv (GQA); mask: boolean,
    broadcastable to [B, Hq, Sq, Sk] (True = attend), or a :class:`SegmentMask` (the mask
    with its structure). ``implementation``: None/"xla" (XLA), "cudnn" (flash attention on
    GPU), "splash" (the TPU Pallas kernel of :mod:`splash`; it needs the structure, so a
    plain boolean mask, as in the KV-cache paths, runs under XLA), or "reference" (plain
    einsum softmax, fp32 accumulation). Rows that attend to nothing yield zeros under
    "reference" and are the caller's responsibility otherwise.
    """
    if implementation == "splash":
        if isinstance(mask, SegmentMask):
            return splash.splash_attention(q, k, v, mask.q_segment_ids, mask.kv_segment_ids,
                                           causal=mask.causal)
        if mask is None:
            ids = jnp.zeros(q.shape[:2], jnp.int32)
            return splash.splash_attention(q, k, v, ids, jnp.zeros(k.shape[:2], jnp.int32), causal=False)
        implementation = "xla"
    if isinstance(mask, SegmentMask):
        mask = mask.as_dense()
    if implementation in (None, "xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    if implementation != "reference":
        raise ValueError(f"unknown attention implementation {implementation!r}")
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, sq, hkv, hq // hkv, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(d))
    if mask is not None:
        m = jnp.broadcast_to(mask, (b, hq, sq, k.shape[1])).reshape(b, hkv, hq // hkv, sq, -1)
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        w = jnp.where(m, w, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", w.astype(v.dtype), v)
    return out.reshape(b, sq, hq, d)


def attention_over_blocks(q: jax.Array, blocks, implementation: str | None = None) -> jax.Array:
    """Attention of q over the union of several key/value blocks, without concatenating
    the keys or values.

    q: [B, Sq, Hq, D]; blocks: a sequence of (k, v, mask), k and v [B, Sk_i, Hkv, D], mask
    boolean broadcastable to [B, Hq, Sq, Sk_i] (a :class:`SegmentMask` gives its dense mask).
    One softmax runs over all the blocks' keys: the same numbers as
    ``attention(..., "reference")`` on the concatenated keys and mask. Only the
    [B, H, Sq, sum Sk_i] scores are joined, so a caller that attends to blocks kept from
    earlier calls (a prefix computed piece by piece) holds each block once, in a forward and
    in its backward, instead of a concatenated copy per call. The scores are computed in
    fp32 with einsums whatever ``implementation`` says (accepted for a uniform signature).
    Rows that attend to nothing yield zeros.
    """
    del implementation
    b, sq, hq, d = q.shape
    hkv = blocks[0][0].shape[2]
    qg = q.reshape(b, sq, hkv, hq // hkv, d)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    neg = jnp.finfo(jnp.float32).min
    logits, masks = [], []
    for k, _, mask in blocks:
        mask = mask.as_dense() if isinstance(mask, SegmentMask) else mask
        lg = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
        m = jnp.broadcast_to(mask, (b, hq, sq, k.shape[1])).reshape(b, hkv, hq // hkv, sq, -1)
        logits.append(jnp.where(m, lg, neg))
        masks.append(m)
    sizes = [k.shape[1] for k, _, _ in blocks]
    w = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    w = jnp.where(jnp.concatenate(masks, axis=-1), w, 0.0)
    out = None
    offset = 0
    for (_, v, _), n in zip(blocks, sizes):
        part = jnp.einsum("bhgqk,bkhd->bqhgd", w[..., offset:offset + n].astype(v.dtype), v)
        out = part if out is None else out + part
        offset += n
    return out.reshape(b, sq, hq, d)


# Segment id of positions past the sequence in local_segment_attention's blocks and bands.
_OUTSIDE_ID = splash.PAD_KEY_ID + 1


def local_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                            max_segment_len: int, implementation: str | None = None) -> jax.Array:
    """Attention within contiguous segments of at most ``max_segment_len`` positions, in
    memory linear in the sequence length.

    q, k, v: [B, N, H, D]; segment_ids [B, N]: position i attends to j iff their ids are
    equal, and every segment must be one contiguous run of at most W = ``max_segment_len``
    positions. The sequence is cut into blocks of W queries; a segment that meets block i
    lies inside blocks i-1..i+1, so each block attends to those 3W keys with the id mask.
    Same numbers as ``attention`` with the dense [N, N] id mask (the masked keys weigh 0).
    Under "splash" each block of queries and its band run through the kernel by their ids.
    """
    b, n, h, d = q.shape
    w = max_segment_len
    nb = -(-n // w)
    pad = nb * w - n
    real = jnp.arange(nb * w) < n

    def blocks(x):  # [B, N, ...] -> query blocks [B, nb, W, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((b, nb, w) + x.shape[2:])

    def bands(x):  # [B, N, ...] -> key bands [B, nb, 3W, ...] (blocks i-1, i, i+1)
        x = jnp.pad(x, [(0, 0), (w, pad + w)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, nb + 2, w) + x.shape[2:])
        return jnp.concatenate([x[:, :-2], x[:, 1:-1], x[:, 2:]], axis=2)

    key_real = bands(jnp.ones((b, n), bool))  # False where a band reaches past the sequence
    q_ids, kv_ids = blocks(segment_ids), bands(segment_ids)
    same = q_ids[..., :, None] == kv_ids[..., None, :]
    # Padding queries (past N) attend to everything so that no row is empty; they are dropped.
    mask = (same & key_real[..., None, :]) | ~real.reshape(nb, w)[None, :, :, None]
    # The same rows by ids alone (for the splash kernel): positions past N, as queries and
    # as keys, share an id no real position has, and a padding query finds itself among
    # its block's keys.
    q_ids = jnp.where(real.reshape(nb, w)[None], q_ids, _OUTSIDE_ID)
    kv_ids = jnp.where(key_real, kv_ids, _OUTSIDE_ID)
    mask = SegmentMask(q_ids.reshape(b * nb, w), kv_ids.reshape(b * nb, 3 * w),
                       dense=mask.reshape(b * nb, 1, w, 3 * w))
    out = attention(blocks(q).reshape(b * nb, w, h, d), bands(k).reshape(b * nb, 3 * w, -1, d),
                    bands(v).reshape(b * nb, 3 * w, -1, d), mask, implementation)
    return out.reshape(b, nb * w, h, d)[:, :n]


def query_chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                            query_chunk: int, implementation: str | None = None) -> jax.Array:
    """Attention where i attends to j iff ``segment_ids`` are equal (any layout), computed for
    ``query_chunk`` queries at a time: one [B, H, chunk, N] block of scores is live instead
    of [B, H, N, N]. The chunk is rematerialised, so a backward pass recomputes it too.

    q, k, v: [B, N, H, D]; segment_ids [B, N]. Same numbers as ``attention`` with the dense
    id mask. Under "splash" the kernel takes all queries at once (it never holds more than
    one tile of scores).
    """
    if implementation == "splash":  # the kernel holds one tile of scores: no chunks needed
        return attention(q, k, v, SegmentMask(segment_ids, segment_ids), implementation)
    b, n, h, d = q.shape
    c = min(query_chunk, n)
    nc = -(-n // c)
    pad = nc * c - n
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nc, c, h, d).swapaxes(0, 1)
    ids = jnp.pad(segment_ids, ((0, 0), (0, pad))).reshape(b, nc, c).swapaxes(0, 1)
    real = (jnp.arange(nc * c) < n).reshape(nc, c)

    def one_chunk(xs):
        q_c, ids_c, real_c = xs
        # Padding queries attend to everything so that no row is empty; they are dropped.
        mask = (ids_c[:, :, None] == segment_ids[:, None, :]) | ~real_c[None, :, None]
        return attention(q_c, k, v, mask[:, None], implementation)

    out = jax.lax.map(jax.checkpoint(one_chunk, prevent_cse=False), (qc, ids, real))
    return out.swapaxes(0, 1).reshape(b, nc * c, h, d)[:, :n]


REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn: Callable, policy: str) -> Callable:
    """Wraps a scanned layer body in ``jax.checkpoint`` with the named policy."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose from {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)
