"""TPU splash attention (Pallas) for the model's attention shapes, with segment ids.

``splash_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=...)`` is the kernel path
of :func:`ilvr_jax.model.layers.attention` for implementation "splash": query i attends to
key j iff their segment ids are equal (and j <= i when causal). Text decoders give real
tokens one id and every padding token an id of its own, so padding never mixes with real
tokens and every query row holds at least itself; the vision tower gives window / frame ids.

What the wrapper does around the kernel, because the kernel needs it:
* q/k/v come as [B, S, H, D] (GQA: Hq a multiple of Hkv); the kernel takes one sample's
  [H, S, D], so samples run under ``vmap``.
* Logits are not scaled inside the kernel: q is scaled by 1/sqrt(D) first (in fp32, cast
  back to q's dtype). The kernel computes in the input dtype.
* Sequences are padded up to a multiple of the block size (blocks are multiples of 128
  lanes). Padded keys carry an id no query has (``PAD_KEY_ID``); padded queries carry the
  id of key 0, so their rows are never empty, and are dropped afterwards.
* On a mesh (``sharding.current_mesh()``) the kernel runs inside ``jax.shard_map`` over the
  batch axes and the head axis of the logical rules ("batch", "act_heads"/"act_kv_heads");
  a dimension those axes do not divide is not split (the kernel then runs replicated over
  that axis). The kernel never sees a split sequence.
* Off TPU the kernel runs in Pallas interpret mode on the CPU (tests; slow but exact).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from ilvr_jax import sharding

LANES = 128
DEFAULT_BLOCK = 512
# Segment id of the keys added to reach a block multiple; real ids must differ from it.
PAD_KEY_ID = int(np.iinfo(np.int32).min)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_and_padded_len(n: int, block: int = DEFAULT_BLOCK) -> tuple[int, int]:
    """(block, padded length) for a sequence of ``n``: the block is ``block`` or, for a
    shorter sequence, ``n`` rounded up to 128 lanes; the padded length a multiple of it."""
    if block < LANES or block % LANES:
        raise ValueError(f"splash block size must be a positive multiple of {LANES}, got {block}")
    b = min(block, _round_up(max(n, 1), LANES))
    return b, _round_up(max(n, 1), b)


def mesh_platform(mesh) -> str | None:
    """The platform ("tpu", "gpu", "cpu") of a mesh's devices; None for no mesh or an
    abstract mesh (no devices)."""
    devices = getattr(mesh, "devices", None)
    if devices is None or not hasattr(devices, "flat"):
        return None
    platform = next(iter(devices.flat)).platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def _kernel(hq: int, sq: int, sk: int, causal: bool, bq: int, bkv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    one = sa.CausalMask((sq, sk)) if causal else sa.FullMask((sq, sk))
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                           block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                           block_q_dq=bq, block_kv_dq=bkv)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * hq), block_sizes=blocks, head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def _local_splash(q, k, v, q_ids, kv_ids, *, causal: bool, block: int, interpret: bool):
    """The kernel on one device's shard: q [b, Sq, Hq, D], k/v [b, Sk, Hkv, D], ids [b, S]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    _, sq, hq, d = q.shape
    sk = k.shape[1]
    bq, sq_pad = block_and_padded_len(sq, block)
    bkv, sk_pad = block_and_padded_len(sk, block)
    q = (q.astype(jnp.float32) / np.sqrt(d)).astype(q.dtype)
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    q, k, v = pad(q, sq_pad), pad(k, sk_pad), pad(v, sk_pad)
    q_ids = jnp.concatenate([q_ids, jnp.broadcast_to(kv_ids[:, :1], (q_ids.shape[0], sq_pad - sq))], axis=1)
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, sk_pad - sk)), constant_values=PAD_KEY_ID)
    kernel = _kernel(hq, sq_pad, sk_pad, causal, bq, bkv, interpret)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [b, S, H, D] -> [b, H, S, D]
    out = jax.vmap(lambda q1, k1, v1, qi, ki: kernel(q1, k1, v1, sa.SegmentIds(qi, ki)))(
        heads_first(q), heads_first(k), heads_first(v), q_ids, kv_ids)
    return heads_first(out)[:, :sq].astype(q.dtype)


def _specs(mesh, q, k):
    """shard_map specs (q, kv, ids) by the logical rules; a head split that would cut a GQA
    group apart (kv heads not divided like the q heads) leaves heads whole."""
    q_spec = sharding.named_sharding(mesh, ("batch", None, "act_heads", None), q.shape).spec
    kv_spec = sharding.named_sharding(mesh, ("batch", None, "act_kv_heads", None), k.shape).spec
    q_spec = tuple(q_spec) + (None,) * (4 - len(q_spec))
    kv_spec = tuple(kv_spec) + (None,) * (4 - len(kv_spec))
    batch = q_spec[0] if q_spec[0] == kv_spec[0] else None
    heads = q_spec[2] if q_spec[2] == kv_spec[2] else None
    return (PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None, heads, None),
            PartitionSpec(batch, None))


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, *, causal: bool, block: int = DEFAULT_BLOCK,
                     interpret: bool | None = None, mesh=None) -> jax.Array:
    """Segment-id (optionally causal) attention with the splash kernel.

    q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D], Hq a multiple of Hkv; q_segment_ids [B, Sq],
    kv_segment_ids [B, Sk] int: query i attends to key j iff the ids are equal and, when
    ``causal``, j <= i (query and key positions counted from 0 in both sequences). Ids must
    not equal ``PAD_KEY_ID``, and every query needs a key it may attend to (the kernel's
    softmax over an empty row is not zero). ``block``: the kernel's tile (a multiple of 128;
    shorter sequences use one tile). ``interpret``: Pallas interpret mode; by default on
    unless the mesh's devices (or the default backend, without a mesh) are TPUs.
    ``mesh``: defaults to :func:`sharding.current_mesh`.
    Returns [B, Sq, Hq, D] in q's dtype.
    """
    b, sq, hq, d = q.shape
    if k.ndim != 4 or k.shape[0] != b or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"splash attention: k {k.shape} / v {v.shape} do not match q {q.shape} "
                         "([B, S, H, D] with the same B and D)")
    if hq % k.shape[2]:
        raise ValueError(f"splash attention: {hq} query heads are not a multiple of {k.shape[2]} kv heads")
    if q_segment_ids.shape != (b, sq) or kv_segment_ids.shape != (b, k.shape[1]):
        raise ValueError(f"splash attention: segment ids {q_segment_ids.shape} / {kv_segment_ids.shape} do "
                         f"not match q {q.shape} / k {k.shape}")
    mesh = sharding.current_mesh() if mesh is None else mesh
    platform = mesh_platform(mesh) or jax.default_backend()
    if interpret is None:
        if platform == "gpu":
            raise ValueError("splash attention is a TPU kernel; on GPUs use attention implementation 'cudnn'")
        interpret = platform != "tpu"
    fn = functools.partial(_local_splash, causal=causal, block=block, interpret=interpret)
    q_ids = jnp.asarray(q_segment_ids, jnp.int32)
    kv_ids = jnp.asarray(kv_segment_ids, jnp.int32)
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, q_ids, kv_ids)
    q_spec, kv_spec, ids_spec = _specs(mesh, q, k)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_ids, kv_ids)

