"""The ILVR train step: one function, compiled once per (stage, shapes), sharded by pjit.

    state, batch, rng -> new state, metrics

Stage 1: one teacher forward (no gradient) gives the user summary, per-segment text means
and the helper-image candidates; ``select_helper_patches`` picks each segment's targets;
the student is teacher-forced with them and trained on CE + latent alignment. The
momentum teacher is then moved towards the student (EMA).
Stage 2: the student feeds its own last hidden states back into the latent pads
(KV-cached recurrence) and is trained on CE alone.

Gradient accumulation runs inside the step as a ``lax.scan`` over micro-batches, so one
call is one optimizer update. Loss normalisation (``loss_normalization``):
"sample" (default) reproduces the reference, which trains one sample per micro-batch and
divides each micro-batch loss by the accumulation steps: the loss is the mean over the
real samples of the global batch of (ce_weight * token-mean CE_b + sim_weight * L_sim_b),
a sample without latent segments adding 0 to the alignment term. "token" takes the CE as
the token mean over the whole global batch (HF's Trainer at batch > 1) and keeps the
alignment term's sample mean.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from ilvr_jax import sharding as sh
from ilvr_jax import ilvr
from ilvr_jax.model import qwen25vl, rope, vision
from ilvr_jax.model.config import ModelConfig
from ilvr_jax.train import optimizer as opt_lib

Params = dict[str, Any]
Batch = dict[str, jax.Array]

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw",
              "helper_pixel_values", "helper_grid_thw", "latent_starts", "segment_mask",
              "assistant_start", "sample_mask")


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly.

    ``params``: the student, full tree (trainable and frozen leaves).
    ``teacher``: the momentum teacher's *trainable* leaves only, kept in fp32; its frozen
    leaves are the student's (a frozen leaf's EMA is itself), which saves their memory and
    makes the question-image features of student and teacher identical.
    ``opt_state``: optimizer state of the trainable leaves only.
    """

    step: jax.Array
    params: Params
    teacher: Params | None
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step (hashable; part of the compiled program)."""

    model: ModelConfig
    stage: int = 1
    latent_size: int = 8               # K
    top_p: float = 0.9                 # p
    num_candidates: int = 256          # L
    ema_decay: float = 0.999
    ce_weight: float = 1.0
    sim_weight: float = 1.0
    noise_scale: float = 0.01
    grad_accum_steps: int = 1
    compute_dtype: Any = jnp.float32
    teacher_dtype: Any = jnp.float32
    remat_policy: str = "none"
    attn_impl: str | None = None
    frozen_patterns: tuple[str, ...] = ("visual/.*",)
    nan_policy: str = "stop"           # "stop": report non-finite loss; "skip": also keep the old state
    loss_normalization: str = "sample"  # "sample" (the reference) or "token"
    stage2_chunk_len: int | tuple | None = None  # stage-2 text-chunk windows (see ilvr.recurrence)
    stage2_unroll: bool = False        # inline the latent steps and the layer loops (see ilvr.recurrence)
    ce_chunk: int = 1024               # CE over this many tokens at a time (no [B,S,V] logits); 0: full logits
    target_selection: str = "teacher"  # latent targets: "teacher" (ILVR), "random" or "mean_pool" (baselines)

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.latent_size < 1:
            raise ValueError(f"latent_size K must be >= 1, got {self.latent_size}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_candidates < 1:
            raise ValueError(f"num_candidates L must be >= 1, got {self.num_candidates}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        if self.ce_chunk < 0:
            raise ValueError(f"ce_chunk must be >= 0 (0 = full logits), got {self.ce_chunk}")
        if self.target_selection not in ilvr.TARGET_SELECTIONS:
            raise ValueError(f"target_selection must be one of {ilvr.TARGET_SELECTIONS}, "
                             f"got {self.target_selection!r}")
        if self.loss_normalization not in ("sample", "token"):
            raise ValueError(f"loss_normalization must be 'sample' or 'token', got {self.loss_normalization!r}")
        m = self.model
        if None in (m.latent_pad_token_id, m.latent_start_token_id, m.latent_end_token_id):
            raise ValueError("the model config has no latent token ids; add the latent tokens first")

    @property
    def token_ids(self) -> ilvr.SpecialTokens:
        return ilvr.SpecialTokens.from_config(self.model)


# ----------------------------------------------------------------------------- state
def init_train_state(params: Params, tx: optax.GradientTransformation, cfg: StepConfig,
                     rng: jax.Array) -> TrainState:
    """Fresh state: teacher = student (trainable leaves, in ``teacher_dtype``)."""
    trainable, _ = opt_lib.split_frozen(params, cfg.frozen_patterns)
    teacher = None
    if cfg.stage == 1:
        teacher = jax.tree.map(lambda x: jnp.array(x, cfg.teacher_dtype), trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, teacher=teacher,
                      opt_state=tx.init(trainable), rng=rng)


# ----------------------------------------------------------------------------- pieces
def _question_features(params: Params, cfg: StepConfig, batch: Batch) -> jax.Array:
    """Merged vision tokens [B, Pq//4, D] of the question images."""
    return vision.vision_forward(params["visual"], cfg.model.vision, batch["pixel_values"],
                                 batch["image_grid_thw"], dtype=cfg.compute_dtype,
                                 remat_policy=cfg.remat_policy, attn_impl=cfg.attn_impl)


def teacher_targets(teacher_params: Params, cfg: StepConfig, batch: Batch,
                    question_feats: jax.Array, position_ids: jax.Array,
                    key: jax.Array | None = None) -> ilvr.Selection:
    """One teacher forward for all segments -> each segment's selected targets (no gradient).

    Latent pads keep their plain token embedding; question images are in; helper images
    go through the teacher's vision tower only, as candidates. ``cfg.target_selection``
    swaps the teacher's choice for a baseline's (``ilvr.target_baselines``): "random"
    keeps the teacher's K* and draws the patches with ``key``; "mean_pool" needs only
    the helper features (no language-model forward)."""
    m = cfg.model
    ids = cfg.token_ids
    teacher_params = jax.lax.stop_gradient(teacher_params)
    helper = vision.vision_forward(teacher_params["visual"], m.vision, batch["helper_pixel_values"],
                                   batch["helper_grid_thw"], dtype=cfg.compute_dtype,
                                   attn_impl=cfg.attn_impl)
    cands, cand_mask = ilvr.pool_candidates(helper.astype(jnp.float32), batch["helper_grid_thw"],
                                            cfg.num_candidates, m.vision.merge_unit)
    if cfg.target_selection == "mean_pool":
        return ilvr.mean_pooled_targets(cands, cand_mask, batch["segment_mask"], cfg.latent_size)
    input_ids = batch["input_ids"]
    tok_embeds = qwen25vl.embed_tokens(teacher_params, input_ids)
    embeds = qwen25vl.merge_image_features(tok_embeds.astype(cfg.compute_dtype), input_ids,
                                           question_feats.astype(cfg.compute_dtype), m)
    out = qwen25vl.forward(teacher_params, m, input_ids, batch["attention_mask"], inputs_embeds=embeds,
                           position_ids=position_ids, dtype=cfg.compute_dtype,
                           attn_impl=cfg.attn_impl, return_logits=False)
    hidden = out.hidden.astype(jnp.float32)
    last = jax.tree.map(lambda x: x[-1], teacher_params["text"]["layers"]["self_attn"])
    img_index, img_valid = ilvr.image_rows(batch["image_grid_thw"], question_feats.shape[1],
                                           m.vision.merge_unit)
    u = ilvr.user_summary(
        hidden, input_ids, batch["attention_mask"], batch["assistant_start"],
        last["q_proj"], last["k_proj"], num_heads=m.text.num_attention_heads,
        num_kv_heads=m.text.num_key_value_heads, ids=ids,
        token_embeds=tok_embeds.astype(jnp.float32), question_feats=question_feats.astype(jnp.float32),
        question_image_index=img_index, question_feat_mask=img_valid)
    t, t_present = ilvr.segment_text_means(
        hidden, input_ids, batch["attention_mask"], batch["latent_starts"], batch["segment_mask"],
        batch["assistant_start"], cfg.latent_size, ids)
    sel = ilvr.select_helper_patches(u, t, t_present, cands, cand_mask, batch["segment_mask"],
                                     cfg.latent_size, cfg.top_p)
    if cfg.target_selection == "random":
        return ilvr.random_helper_patches(key, cands, cand_mask, batch["segment_mask"], sel.kstar,
                                          cfg.latent_size)
    return sel


def _input_embeds(params: Params, cfg: StepConfig, batch: Batch, question_feats: jax.Array) -> jax.Array:
    ids = batch["input_ids"]
    embeds = qwen25vl.embed_tokens(params, ids).astype(cfg.compute_dtype)
    return qwen25vl.merge_image_features(embeds, ids, question_feats.astype(cfg.compute_dtype), cfg.model)


def _next_token_ce(params: Params, cfg: StepConfig, hidden: jax.Array, labels: jax.Array):
    """Per-sample next-token CE (sum [B], count [B]) of the LM head on ``hidden``: in
    ``cfg.ce_chunk``-token pieces, or from the full [B, S, V] logits when it is 0."""
    if cfg.ce_chunk == 0:
        return ilvr.next_token_ce_per_sample(qwen25vl.lm_logits(params, cfg.model, hidden), labels)
    tied = cfg.model.text.tie_word_embeddings
    head = params["text"]["embed_tokens"]["embedding"] if tied else params["lm_head"]["kernel"]
    return ilvr.next_token_ce_chunked(hidden, head, labels, tied=tied, chunk=cfg.ce_chunk)


def student_stage1(params: Params, cfg: StepConfig, batch: Batch, question_feats: jax.Array,
                   position_ids: jax.Array, sel: ilvr.Selection, noise_key: jax.Array):
    """Teacher-forced student forward -> (CE sum [B], CE count [B], L_sim [B], pairs [B])."""
    embeds = _input_embeds(params, cfg, batch, question_feats)
    embeds, fed_mask = ilvr.teacher_forcing_embeds(
        embeds, sel.targets.astype(cfg.compute_dtype), sel.kstar, batch["latent_starts"],
        batch["segment_mask"])
    out = qwen25vl.forward(params, cfg.model, batch["input_ids"], batch["attention_mask"],
                           inputs_embeds=embeds, position_ids=position_ids, dtype=cfg.compute_dtype,
                           remat_policy=cfg.remat_policy, attn_impl=cfg.attn_impl,
                           return_logits=False)
    ce_sum, ce_count = _next_token_ce(params, cfg, out.hidden, batch["labels"])
    sim, pairs = ilvr.latent_alignment_loss(out.hidden, embeds, fed_mask, noise_key, cfg.noise_scale)
    return ce_sum, ce_count, sim, pairs


def student_stage2(params: Params, cfg: StepConfig, batch: Batch, question_feats: jax.Array,
                   position_ids: jax.Array):
    """Student with its own hidden states fed back into the latent pads -> (CE sum [B], count [B])."""
    from ilvr_jax.ilvr import recurrence

    embeds = _input_embeds(params, cfg, batch, question_feats)
    hidden = recurrence.latent_recurrence_forward(
        params["text"], cfg.model.text, embeds, batch["attention_mask"], position_ids,
        batch["latent_starts"], batch["segment_mask"], cfg.latent_size, chunk_len=cfg.stage2_chunk_len,
        dtype=cfg.compute_dtype,
        remat_policy=cfg.remat_policy, attn_impl=cfg.attn_impl, unroll=cfg.stage2_unroll)
    return _next_token_ce(params, cfg, hidden, batch["labels"])


# ----------------------------------------------------------------------------- losses
class LossNormalizers(NamedTuple):
    """The global normalisers of a loss: real samples and CE target tokens of the whole
    batch (known before any forward pass, so gradient accumulation stays exact)."""

    samples: jax.Array
    tokens: jax.Array


def mask_padding_samples(batch: Batch) -> Batch:
    """Padding samples (``sample_mask`` False, a short last batch) carry no targets and no
    segments. Idempotent."""
    batch = dict(batch)
    sample_mask = batch["sample_mask"].astype(bool)
    batch["labels"] = jnp.where(sample_mask[:, None], batch["labels"], ilvr.IGNORE_INDEX)
    batch["segment_mask"] = batch["segment_mask"].astype(bool) & sample_mask[:, None]
    return batch


def loss_normalizers(batch: Batch) -> LossNormalizers:
    """The normalisers of ``batch`` (padding samples masked)."""
    batch = mask_padding_samples(batch)
    samples = jnp.maximum(jnp.sum(batch["sample_mask"].astype(bool)), 1).astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(batch["labels"][:, 1:] != ilvr.IGNORE_INDEX), 1).astype(jnp.float32)
    return LossNormalizers(samples, tokens)


def _ce_term(cfg: StepConfig, batch: Batch, ce_sum: jax.Array, ce_cnt: jax.Array,
             norm: LossNormalizers) -> jax.Array:
    real = batch["sample_mask"].astype(jnp.float32)
    if cfg.loss_normalization == "sample":
        return jnp.sum(real * ce_sum / jnp.maximum(ce_cnt, 1)) / norm.samples
    return jnp.sum(ce_sum) / norm.tokens


def _loss_inputs(params: Params, cfg: StepConfig, batch: Batch, norm, question_feats, position_ids):
    batch = mask_padding_samples(batch)
    norm = loss_normalizers(batch) if norm is None else norm
    if position_ids is None:
        position_ids, _ = rope.mrope_position_ids(batch["input_ids"], batch["attention_mask"],
                                                  batch["image_grid_thw"], cfg.model)
    if question_feats is None:
        question_feats = _question_features(params, cfg, batch)
    return batch, norm, question_feats, position_ids


def stage1_loss(params: Params, teacher: Params, cfg: StepConfig, batch: Batch, key: jax.Array, *,
                norm: LossNormalizers | None = None, question_feats: jax.Array | None = None,
                teacher_question_feats: jax.Array | None = None,
                position_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-1 loss of the student ``params`` (full tree) with targets chosen by ``teacher``
    (full tree; no gradient flows into it):

        loss = ce_weight * CE + sim_weight * (1/N) sum_b L_sim_b

    CE = (1/N) sum_b CE_b (token-mean CE of sample b; ``loss_normalization="sample"``, the
    reference) or sum of token losses / target tokens (``"token"``); N = real samples.
    ``norm`` overrides N and the token count (the global batch's, under accumulation);
    ``question_feats`` / ``teacher_question_feats`` / ``position_ids`` may be passed when
    already computed (frozen vision: student and teacher features are the same). ``key``
    draws the alignment noise (and the patches of ``target_selection="random"``).
    Returns (loss, aux) with aux: loss, ce_sum (the CE term), sim_sum (the L_sim term),
    ce_tokens, pairs, kstar_sum, segments.
    """
    batch, norm, q_feats, pos = _loss_inputs(params, cfg, batch, norm, question_feats, position_ids)
    if teacher_question_feats is None:
        teacher_question_feats = _question_features(jax.lax.stop_gradient(teacher), cfg, batch)
    sel = teacher_targets(teacher, cfg, batch, teacher_question_feats, pos, jax.random.fold_in(key, 1))
    sel = jax.tree.map(jax.lax.stop_gradient, sel)
    ce_sum, ce_cnt, sim, pairs = student_stage1(params, cfg, batch, q_feats, pos, sel, key)
    ce_term = _ce_term(cfg, batch, ce_sum, ce_cnt, norm)
    sim_term = jnp.sum(batch["sample_mask"].astype(jnp.float32) * sim) / norm.samples
    loss = cfg.ce_weight * ce_term + cfg.sim_weight * sim_term
    seg = batch["segment_mask"]
    aux = dict(loss=loss, ce_sum=ce_term, sim_sum=sim_term, ce_tokens=jnp.sum(ce_cnt).astype(jnp.float32),
               pairs=jnp.sum(pairs).astype(jnp.float32),
               kstar_sum=jnp.sum(jnp.where(seg, sel.kstar, 0)).astype(jnp.float32),
               segments=jnp.sum(seg).astype(jnp.float32))
    return loss, aux


def stage2_loss(params: Params, cfg: StepConfig, batch: Batch, *, norm: LossNormalizers | None = None,
                question_feats: jax.Array | None = None,
                position_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-2 loss: the CE alone (normalised as in :func:`stage1_loss`, unscaled by
    ce_weight) of the student with its own last hidden states fed back into the latent
    pads. Returns (loss, aux) with the keys of :func:`stage1_loss` (sim and K* terms 0)."""
    batch, norm, q_feats, pos = _loss_inputs(params, cfg, batch, norm, question_feats, position_ids)
    ce_sum, ce_cnt = student_stage2(params, cfg, batch, q_feats, pos)
    loss = _ce_term(cfg, batch, ce_sum, ce_cnt, norm)
    zero = jnp.zeros((), jnp.float32)
    aux = dict(loss=loss, ce_sum=loss, sim_sum=zero, ce_tokens=jnp.sum(ce_cnt).astype(jnp.float32),
               pairs=zero, kstar_sum=zero, segments=jnp.sum(batch["segment_mask"]).astype(jnp.float32))
    return loss, aux


# ----------------------------------------------------------------------------- the step
def _microbatches(batch: Batch, n: int) -> Batch:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps {n}")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree.map(split, batch)


_SUMS = ("loss", "ce_sum", "ce_tokens", "sim_sum", "kstar_sum", "segments", "tokens", "pairs")


def train_step(state: TrainState, batch: Batch, cfg: StepConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule):
    """One optimizer update on a global batch: the gradient of the stage's loss
    (:func:`stage1_loss` / :func:`stage2_loss`, accumulated over micro-batches with the
    global normalisers), the optimizer update, and in stage 1 the teacher's EMA.
    Returns (new_state, metrics)."""
    batch = mask_padding_samples(batch)
    norm = loss_normalizers(batch)
    trainable, frozen = opt_lib.split_frozen(state.params, cfg.frozen_patterns)
    frozen = jax.lax.stop_gradient(frozen)
    teacher_full = None
    if cfg.stage == 1:
        teacher_full = opt_lib.merge_params(state.teacher, frozen)
    # With the whole vision tower frozen, student and teacher see identical question-image
    # features (the teacher shares the frozen leaves): compute them once.
    vision_frozen = "visual" not in trainable
    rng, step_rng = jax.random.split(state.rng)

    def micro_grads(carry, xs):
        mb, key = xs
        grads_acc, sums = carry
        position_ids, _ = rope.mrope_position_ids(mb["input_ids"], mb["attention_mask"],
                                                  mb["image_grid_thw"], cfg.model)
        q_shared = (_question_features(opt_lib.merge_params(trainable, frozen), cfg, mb)
                    if vision_frozen else None)

        def loss_fn(tr):
            params = opt_lib.merge_params(tr, frozen)
            if cfg.stage == 1:
                return stage1_loss(params, teacher_full, cfg, mb, key, norm=norm, question_feats=q_shared,
                                   teacher_question_feats=q_shared, position_ids=position_ids)
            return stage2_loss(params, cfg, mb, norm=norm, question_feats=q_shared, position_ids=position_ids)

        (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        grads_acc = jax.tree.map(jnp.add, grads_acc, g)
        aux["tokens"] = jnp.sum(mb["attention_mask"] * mb["sample_mask"][:, None]).astype(jnp.float32)
        return (grads_acc, jax.tree.map(jnp.add, sums, aux)), None

    micro = _microbatches(batch, cfg.grad_accum_steps)
    keys = jax.random.split(step_rng, cfg.grad_accum_steps)
    zeros_g = jax.tree.map(jnp.zeros_like, trainable)
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in _SUMS}
    (grads, sums), _ = jax.lax.scan(micro_grads, (zeros_g, zero_sums), (micro, keys))

    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    new_teacher = state.teacher
    if cfg.stage == 1:
        new_teacher = ilvr.ema_update(state.teacher, new_trainable, cfg.ema_decay, cfg.teacher_dtype)
    new_state = state.replace(step=state.step + 1, params=opt_lib.merge_params(new_trainable, frozen),
                              teacher=new_teacher, opt_state=new_opt_state, rng=rng)
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
    if cfg.nan_policy == "skip":
        # Keep the previous parameters; the step counter and rng still advance.
        kept = state.replace(step=state.step + 1, rng=rng)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
    metrics = dict(
        loss=sums["loss"],
        ce=sums["ce_sum"],
        sim=sums["sim_sum"],
        kstar=sums["kstar_sum"] / jnp.maximum(sums["segments"], 1.0),
        grad_norm=grad_norm,
        param_norm=optax.tree.norm(new_trainable),
        lr=schedule(_optimizer_count(state.opt_state, state.step)),
        tokens=sums["tokens"],
        target_tokens=sums["ce_tokens"],
        finite=finite,
    )
    return new_state, metrics


def _optimizer_count(opt_state, fallback: jax.Array) -> jax.Array:
    """The update count the optimizer's schedule reads (it lags ``state.step`` after steps
    skipped by nan_policy="skip"), so the logged lr is the one this update used."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return counts[-1][1] if counts else fallback


# ----------------------------------------------------------------------------- compile
def state_shardings(mesh, state_shapes: TrainState, cfg: StepConfig, tx) -> TrainState:
    """Shardings of every leaf of the state from the model's logical axes (student and
    teacher alike; optimizer moments like their parameters; scalars replicated)."""
    from ilvr_jax.train import mesh as mesh_lib

    axes = qwen25vl.param_axes(cfg.model)
    p_sh = mesh_lib.tree_shardings(mesh, axes, state_shapes.params)
    tr_axes, _ = opt_lib.split_frozen(axes, cfg.frozen_patterns)
    tr_shapes, _ = opt_lib.split_frozen(state_shapes.params, cfg.frozen_patterns)
    tr_sh = mesh_lib.tree_shardings(mesh, tr_axes, tr_shapes)
    rep = mesh_lib.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, state_shapes.opt_state, tr_sh,
                                   transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=p_sh, teacher=tr_sh if state_shapes.teacher is not None else None,
                      opt_state=opt_sh, rng=rep)


def batch_shardings(mesh, batch_shapes: Batch) -> Batch:
    from ilvr_jax.train import mesh as mesh_lib

    return {k: mesh_lib.batch_sharding(mesh, v.ndim) for k, v in batch_shapes.items()}


def compile_train_step(cfg: StepConfig, tx, schedule, mesh=None, state_shapes=None,
                       batch_shapes=None) -> Callable:
    """``jax.jit`` of :func:`train_step` with the state donated; with a mesh, in/out
    shardings for state and batch come from the logical axis rules, and activations are
    constrained inside the model."""

    def fn(state, batch):
        with sh.activation_mesh(mesh):
            return train_step(state, batch, cfg, tx, schedule)

    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,))
    st_sh = state_shardings(mesh, state_shapes, cfg, tx)
    b_sh = batch_shardings(mesh, batch_shapes)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(fn, in_shardings=(st_sh, b_sh), out_shardings=(st_sh, rep), donate_argnums=(0,))
