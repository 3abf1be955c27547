"""ILVR stage 1 (latent alignment with the momentum teacher).

    python -m ilvr_jax.main --config configs/stage1.py --workdir runs/s1 \
        --config.model.hf_dir=/models/Qwen2.5-VL-7B-Instruct \
        --config.data.train_path=/data/comt/train.jsonl

Presets: ``configs/stage1.py:demo`` (tiny model from scratch + generated mazes, CPU),
``:debug`` (tiny, a few steps), ``:v5p_8``, ``:v5p_8_32k`` (the paper's 32768 tokens),
``:v5e_16`` (stage 1 only: stage 2 needs ``:v5e_32``), ``:v5e_32`` (TPU pods), ``:gpu_8`` (one 8-GPU host). The default is the paper's setting with Qwen2.5-VL-7B from a local directory.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("paper", "demo", "debug", "v5p_8", "v5p_8_32k", "v5e_16", "v5e_32", "gpu_8")


# Every key of the config, its default (a function of the stage where it differs) and what it
# means: the one place the keys are documented (``python -m ilvr_jax.main --config FILE[:PRESET]
# --describe`` prints them with the resolved values).
KEYS: tuple[tuple[str, object, str], ...] = (
    ("stage", lambda s: s, "1: latent alignment with the momentum teacher; 2: the model's own latents, CE only"),
    ("seed", 42, "seeds the initialisation, the data order and the alignment noise"),
    # model
    ("model.hf_dir", "", "local Qwen2.5-VL directory (config.json + safetensors + tokenizer), e.g. a hub download"),
    ("model.init", "hf", "'hf': load model.hf_dir; 'tiny': a tiny random model (demo, tests)"),
    ("model.tiny_shape", "untied_gqa2", "architecture of model.init='tiny' (ilvr_jax.tiny.TINY_SHAPES)"),
    ("model.compute_dtype", "bfloat16", "activations and matmuls: 'bfloat16' or 'float32' (parameters stay fp32)"),
    ("model.remat_policy", "nothing_saveable", "activation checkpointing of the scanned layers (model.layers.REMAT_POLICIES)"),
    ("model.attn_impl", "auto", "attention kernel: 'auto' (splash on TPUs, cudnn on GPUs in bf16, xla elsewhere), "
                                "'xla', 'cudnn' (GPU flash attention), 'splash' (TPU Pallas kernel; interpret "
                                "mode on CPU) or 'reference'"),
    ("model.ce_chunk", 1024, "tokens per chunk of the next-token CE computed from the hidden states (no [B, S, V] "
                             "fp32 logits in memory); 0 = full logits"),
    ("model.vocab_resize", "exact", "rows of the embedding/lm_head after adding the latent tokens: 'exact' = "
                                    "len(tokenizer), as the reference (shrinks Qwen2.5's padded 152064 to 151668, so "
                                    "the CE softmax runs over the tokenizer's classes only); 'grow_only' keeps the padded table"),
    # ilvr
    ("ilvr.latent_size", 8, "K: latent tokens per helper image"),
    ("ilvr.top_p", 0.9, "p: the teacher keeps the fewest top patches whose softmax mass reaches p (K* <= K)"),
    ("ilvr.num_candidates", 256, "L: helper-image tokens are mean-pooled into at most L candidates"),
    ("ilvr.ema_decay", 0.999, "momentum teacher decay d (theta_T <- d theta_T + (1-d) theta_S); 1.0 = a frozen "
                              "teacher, which is what the released trainer does (its EMA hook is never called)"),
    ("ilvr.teacher_dtype", "float32", "teacher storage: keep the EMA in 'float32' (bf16 rounds 1e-3 steps away)"),
    ("ilvr.ce_weight", 1.0, "stage 1: weight of the next-token CE (stage 2's loss is the CE alone)"),
    ("ilvr.sim_weight", 1.0, "stage 1: weight of the latent alignment loss L_sim"),
    ("ilvr.noise_scale", 0.01, "stage 1: std of the noise added to the alignment targets"),
    ("ilvr.target_selection", "teacher", "stage 1: latent targets: 'teacher' (ILVR's momentum-teacher top-p "
     "selection), 'random' (as many patches as the teacher picks, drawn at random: the selection ablation) or "
     "'mean_pool' (Mirage-style: the helper image mean-pooled into K latents)"),
    # data
    ("data.adapter", "canonical", "record format of data.train_path: canonical (CoMT-style JSONL), comt, vsp, "
                                  "zebra (Zebra-CoT parquet folders) or maze (synthetic)"),
    ("data.train_path", "", "training data: a JSONL file (canonical), or what the adapter reads"),
    ("data.image_root", "", "image paths are relative to this directory (default: the JSONL's directory)"),
    ("data.max_length", lambda s: 32768 if s == 1 else 8192, "longest sequence (tokens, image pads and latent "
                                                             "segments included); longer records are dropped"),
    ("data.buckets", "auto", "sequence-length buckets, one compiled shape each: 'auto' (powers of two that hold "
                             "records, up to max_length), '' (every batch padded to max_length) or lengths '512,2048'"),
    ("data.bucket_patches", "auto", "image-patch rows (question:helper) of each bucket's batches: 'auto' (the "
                                    "largest the bucket's records need), '' (max_*_patches everywhere) or "
                                    "'1024:2048,4096:8192', one pair per explicit bucket"),
    ("data.max_question_patches", 16384, "largest question-image patch total per sample (multiple of 4)"),
    ("data.max_helper_patches", 16384, "largest helper-image patch total per sample (multiple of 4)"),
    ("data.max_question_images", 4, "question images per sample at most"),
    ("data.max_segments", 8, "M_max: latent segments (helper images) per sample at most"),
    ("data.min_pixels", 0, "image resize budget, smallest area in pixels; 0 = the model's preprocessor_config.json"),
    ("data.max_pixels", 0, "image resize budget, largest area in pixels; 0 = the model's preprocessor_config.json"),
    ("data.answer_format", "", "text appended after the plan ('{answer}' = original_final_answer); '' = the plan "
                               "alone, as the reference"),
    ("data.batch_size", 8, "global batch per optimizer step (all processes, all accumulation steps)"),
    ("data.shuffle", True, "shuffle every epoch (seeded)"),
    ("data.worker_count", 2, "image-decoding worker processes per host (0 = in the training process)"),
    ("data.drop_policy", "skip", "a bad record: 'skip' (counted and logged) or 'error' (stop, naming it)"),
    ("data.drop_remainder", False, "drop each length bucket's last short batch instead of padding it"),
    ("data.eval_path", "", "held-out records for train.eval_every (through data.adapter); maze adapter without "
                           "it: data.eval_records mazes are generated, none of them a training map"),
    ("data.eval_records", 64, "held-out mazes generated for train.eval_every (maze adapter without data.eval_path)"),
    ("data.scorer", "", "answer scorer of the evaluation: comt, vsp, maze or zebra; '' = the adapter's"),
    ("data.generate_records", 0, "adapter 'maze' without train_path: this many mazes are generated into the workdir"),
    ("data.maze_sizes", (3, 6), "grid sizes (smallest, largest) of generated mazes"),
    # optim
    ("optim.lr", 1e-5, "peak learning rate (AdamW)"),
    ("optim.weight_decay", 0.01, "AdamW weight decay (not on biases and norms)"),
    ("optim.warmup_steps", 10, "linear warm-up steps"),
    ("optim.schedule", "linear", "learning-rate schedule after warm-up: 'linear', 'cosine' or 'constant'"),
    ("optim.clip_norm", 1.0, "clip the global gradient norm to this"),
    ("optim.grad_accum_steps", 8, "micro-batches per optimizer step (data.batch_size must divide by it)"),
    ("optim.frozen", ("visual/.*",), "regexes over parameter paths that are not trained (the vision tower)"),
    # train
    ("train.num_epochs", 15, "passes over the data (when train.num_steps <= 0)"),
    ("train.num_steps", -1, "optimizer steps; > 0 overrides train.num_epochs"),
    ("train.log_every", 10, "steps between metric lines (console, metrics.jsonl, TensorBoard)"),
    ("train.checkpoint_every", 500, "steps between checkpoints (SIGTERM/SIGINT also save one)"),
    ("train.keep_checkpoints", 3, "the newest N checkpoints are kept (0 = all)"),
    ("train.keep_best_metric", "", "'', 'loss', 'ce' or 'sim': also keep the checkpoint with the lowest mean"),
    ("train.async_checkpoints", True, "write checkpoints in the background"),
    ("train.max_steps_ahead", 2, "the host dispatches at most N steps ahead of the device: a SIGTERM is saved "
                                 "within about N step times, and at most N batches wait in memory"),
    ("train.nan_policy", "stop", "a non-finite loss or gradient: 'stop' the run or 'skip' the update"),
    ("train.eval_every", 0, "every N steps (and at the end) generate on the held-out split with latents and log "
                            "the accuracy (eval_accuracy); 0 = never"),
    ("train.eval_batch_size", 8, "rows per generation batch of the evaluation (divisible by data x fsdp)"),
    ("train.eval_max_new_tokens", 512, "the evaluation's generation budget per record"),
    ("train.eval_ablations", "", "also evaluate with the latents ablated, e.g. 'zeros,noise' (zeros, pad, shuffle, "
                                 "noise), reported as eval_accuracy_<mode>"),
    ("train.init_from", "", "stage 2: the stage-1 workdir (or one of its checkpoints/STEP directories)"),
    ("train.export_at_end", True, "write an HF directory of the final student into WORKDIR/export_hf"),
    ("train.loss_normalization", "sample", "'sample': the reference's mean over samples of token-mean CE; "
                                           "'token': HF's token mean"),
    ("train.stage2_chunk_len", "auto", "stage 2: window widths of the latent recurrence's text chunks: 'auto' "
                                       "(the first chunk in a window of the data's longest first chunk, later "
                                       "chunks in its longest later chunk: about one forward) or 'FIRST,REST' "
                                       "(0 = the sequence length, always valid but about M+1 forwards)"),
    ("train.stage2_unroll", False, "stage 2: inline each segment's K latent steps and the decoder layers of the "
                                   "recurrence instead of looping (same numbers; a third off a small model's CPU "
                                   "step, a compiled program that grows with K x layers)"),
    # mesh
    ("mesh.shape", (1, -1, 1), "(data, fsdp, tensor) device mesh; -1 = all remaining devices"),
    ("mesh.distributed", False, "multi-host: call jax.distributed.initialize() first (TPU pods, GPU clusters)"),
    ("mesh.coordinator_address", "", "multi-host: 'host:port' of process 0's coordinator; '' = auto-detect "
                                     "(Cloud TPU, Slurm, Open MPI, Kubernetes)"),
    ("mesh.num_processes", -1, "multi-host: the number of processes (one per host); -1 = auto-detect"),
    ("mesh.process_id", -1, "multi-host: this process's index, 0 .. num_processes-1; -1 = auto-detect"),
    ("mesh.local_device_ids", "", "multi-host: comma-separated local device ids this process uses; '' = all "
                                  "(or auto-detect)"),
)
DOCS = {key: doc for key, _, doc in KEYS}


def base_config(stage: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    for key, default, _ in KEYS:
        node = c
        *parents, leaf = key.split(".")
        for name in parents:
            if name not in node:
                node[name] = ml_collections.ConfigDict()
            node = node[name]
        node[leaf] = default(stage) if callable(default) else default
    return c


def describe(c: ml_collections.ConfigDict) -> str:
    """Every key with its value in ``c`` and what it means, one per line."""

    def value(key):
        node = c
        for name in key.split("."):
            node = node[name]
        return node

    rows = [(f"{key} = {value(key)!r}", doc) for key, _, doc in KEYS]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{left:<{width}}  # {doc}" for left, doc in rows)


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
        c.mesh.shape = (1, 1, 1)
    if preset == "debug":
        c.data.batch_size = 2
        c.train.num_steps = 4
        c.train.log_every = 1
        c.train.checkpoint_every = 2
    if preset in ("v5p_8", "v5p_8_32k"):
        # 4 chips, 95 GiB HBM each: shard the state over all of them.
        c.mesh.shape = (1, 4, 1)
        c.mesh.distributed = True
        c.data.batch_size = 32
        c.optim.grad_accum_steps = 8
        c.data.max_length = 8192
        c.model.remat_policy = "nothing_saveable"
    if preset == "v5p_8_32k":
        # The paper's 32768 tokens (AOT: stage 1 peak 63.7 GiB per chip): 4 samples per step.
        c.data.max_length = 32768
        c.data.batch_size = 8
        c.optim.grad_accum_steps = 2
    if preset in ("v5e_16", "v5e_32"):
        # 16 GiB HBM per chip: fsdp over all chips, full remat, 4096-patch budgets (VSP-size
        # images need far fewer).
        c.mesh.distributed = True
        c.data.batch_size = 64
        c.data.max_length = 8192
        c.model.remat_policy = "nothing_saveable"
        c.data.max_question_patches = 4096
        c.data.max_helper_patches = 4096
    if preset == "v5e_16":
        # 16 chips. What makes stage 1 fit 15.75 GiB (AOT: peak 14.6 GiB): the patch budgets
        # above and a bf16 teacher. In bf16 the EMA's 1e-3 steps mostly round away, so the
        # teacher moves little: close to the released trainer's frozen teacher.
        c.mesh.shape = (1, 16, 1)
        c.optim.grad_accum_steps = 4
        c.ilvr.teacher_dtype = "bfloat16"
    if preset == "v5e_32":
        # 32 chips: where stage 2 at 8192 tokens fits on v5e (AOT: peak 13.2 GiB per chip; on
        # 16 chips it needs ~25.9), with an fp32 teacher in stage 1.
        c.mesh.shape = (1, 32, 1)
        c.optim.grad_accum_steps = 2
    if preset == "gpu_8":
        c.mesh.shape = (1, 8, 1)
        c.model.attn_impl = "cudnn"
        c.data.batch_size = 64
        c.optim.grad_accum_steps = 8
        c.data.max_length = 8192
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return apply_preset(base_config(stage=1), arg or "paper")
