"""ILVR stage 1 (latent alignment with the momentum teacher).

    python -m ilvr_jax.main --config configs/stage1.py --workdir runs/s1 \
        --config.model.hf_dir=/models/Qwen2.5-VL-7B-Instruct \
        --config.data.train_path=/data/comt/train.jsonl

Presets: ``configs/stage1.py:demo`` (tiny model from scratch + generated mazes, CPU),
``:debug`` (tiny, a few steps), ``:v5p_8``, ``:v5e_16`` (TPU pods), ``:gpu_8`` (one 8-GPU
host). The default is the paper's setting with Qwen2.5-VL-7B from a local directory.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("paper", "demo", "debug", "v5p_8", "v5e_16", "gpu_8")


def base_config(stage: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 42

    c.model = ml_collections.ConfigDict()
    c.model.hf_dir = ""                  # local Qwen2.5-VL directory (config.json + safetensors)
    c.model.init = "hf"                  # "hf": load hf_dir; "tiny": a tiny random model (demo/tests)
    c.model.tiny_shape = "untied_gqa2"   # for init="tiny" (see ilvr_jax.tiny.TINY_SHAPES)
    c.model.compute_dtype = "bfloat16"
    c.model.remat_policy = "nothing_saveable"
    c.model.attn_impl = "xla"            # "xla", "cudnn" (GPU flash attention), "reference"
    # Embedding/lm_head rows after adding the latent tokens. "exact": rows = len(tokenizer), as
    # the reference's resize_token_embeddings (shrinks Qwen2.5's padded 152064 to 151668, so the
    # CE softmax runs over the tokenizer's classes only); "grow_only": keep the padded table.
    c.model.vocab_resize = "exact"

    c.ilvr = ml_collections.ConfigDict()
    c.ilvr.latent_size = 8               # K
    c.ilvr.top_p = 0.9                   # p
    c.ilvr.num_candidates = 256          # L
    # Momentum teacher decay (method section 3). The authors' released trainer defines the EMA
    # hook under a name HF's Trainer never calls, so its teacher stays the initial model:
    # ema_decay=1.0 reproduces that; 0.999 is the method as published.
    c.ilvr.ema_decay = 0.999
    c.ilvr.teacher_dtype = "float32"     # keep the EMA in fp32: bf16 rounds 1e-3 steps away
    c.ilvr.ce_weight = 1.0
    c.ilvr.sim_weight = 1.0
    c.ilvr.noise_scale = 0.01

    c.data = ml_collections.ConfigDict()
    c.data.adapter = "canonical"         # canonical (CoMT-style JSONL), comt, vsp, zebra, maze
    c.data.train_path = ""
    c.data.image_root = ""               # default: the directory of train_path
    c.data.max_length = 32768 if stage == 1 else 8192
    c.data.max_question_patches = 16384
    c.data.max_helper_patches = 16384
    c.data.max_question_images = 4
    c.data.max_segments = 8              # M_max
    c.data.min_pixels = 4 * 28 * 28
    c.data.max_pixels = 16384 * 28 * 28
    # Text after the plan, "{answer}" = original_final_answer; "" = nothing: the assistant turn
    # is the plan alone, as in the reference (its plans end with the answer).
    c.data.answer_format = ""
    c.data.batch_size = 8                # global batch per optimizer step
    c.data.shuffle = True
    c.data.worker_count = 2
    c.data.drop_policy = "skip"          # "skip" (count + log) or "error"
    c.data.drop_remainder = False
    c.data.generate_records = 0          # adapter "maze" without train_path: mazes generated into the workdir
    c.data.maze_sizes = (3, 6)           # grid sizes of generated mazes

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 10
    c.optim.schedule = "linear"
    c.optim.clip_norm = 1.0
    c.optim.grad_accum_steps = 8
    c.optim.frozen = ("visual/.*",)      # regexes over parameter paths; the vision tower is frozen

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 15
    c.train.num_steps = -1               # > 0 overrides num_epochs
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3         # the newest N checkpoints are kept (0 = all)
    c.train.keep_best_metric = ""        # "", "loss", "ce" or "sim": also keep the lowest-metric checkpoint
    c.train.async_checkpoints = True
    c.train.nan_policy = "stop"          # "stop" or "skip" a step with a non-finite loss
    c.train.init_from = ""               # stage 2: the stage-1 workdir (or workdir/checkpoints/STEP)
    c.train.export_at_end = True         # write an HF directory of the final student
    c.train.loss_normalization = "sample"  # "sample": the reference's per-sample mean; "token": HF token mean
    # Stage 2: window widths (first text chunk, later chunks) of the KV-cached latent recurrence;
    # 0 = the sequence length (always valid). Tight windows make stage 2 cost about one forward.
    c.train.stage2_chunk_len = (0, 0)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)            # (data, fsdp, tensor); -1 = all remaining devices
    c.mesh.distributed = False           # call jax.distributed.initialize() (multi-host)
    return c


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if preset in ("demo", "debug"):
        c.model.init = "tiny"
        c.model.compute_dtype = "float32"
        c.model.remat_policy = "none"
        c.data.adapter = "maze"          # generated into the workdir
        c.data.train_path = ""
        c.data.generate_records = 64
        c.data.maze_sizes = (3, 4)
        c.data.max_length = 640
        c.data.max_question_patches = 256
        c.data.max_helper_patches = 768
        c.data.max_question_images = 1
        c.data.max_segments = 6
        c.data.min_pixels = 4 * 28 * 28
        c.data.max_pixels = 64 * 28 * 28
        c.data.answer_format = "\n{answer}"  # the maze plans end before the \boxed{} answer
        c.data.batch_size = 4
        c.data.worker_count = 0
        c.ilvr.latent_size = 4
        c.ilvr.num_candidates = 16
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 5
        c.optim.grad_accum_steps = 1
        c.train.log_every = 5
        c.train.checkpoint_every = 20
        c.train.num_steps = 60
        c.train.stage2_chunk_len = (0, 96)
        c.mesh.shape = (1, 1, 1)
    if preset == "debug":
        c.data.batch_size = 2
        c.train.num_steps = 4
        c.train.log_every = 1
        c.train.checkpoint_every = 2
    if preset == "v5p_8":
        # 4 chips, 95 GiB HBM each: shard the state over all of them.
        c.mesh.shape = (1, 4, 1)
        c.mesh.distributed = True
        c.data.batch_size = 32
        c.optim.grad_accum_steps = 8
        c.data.max_length = 8192
        c.model.remat_policy = "nothing_saveable"
    if preset == "v5e_16":
        # 16 chips, 16 GiB HBM each: fsdp over all 16 chips, full remat.
        c.mesh.shape = (1, 16, 1)
        c.mesh.distributed = True
        c.data.batch_size = 64
        c.optim.grad_accum_steps = 4
        c.data.max_length = 8192
        c.model.remat_policy = "nothing_saveable"
    if preset == "gpu_8":
        c.mesh.shape = (1, 8, 1)
        c.model.attn_impl = "cudnn"
        c.data.batch_size = 64
        c.optim.grad_accum_steps = 8
        c.data.max_length = 8192
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return apply_preset(base_config(stage=1), arg or "paper")
