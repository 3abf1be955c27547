"""Decode speed of the compiled latent-mode loop on the tiny model (CPU by default).

    python benchmarks/decode_speed.py [--shape untied_gqa2] [--steps 128] [--repeats 5] [--batches 1,8]

For each batch size: the decode loop alone (prefill excluded) over exactly ``--steps``
tokens per row (no stop token), in text mode (prompts end in text) and in latent mode
(prompts end with ``<|latent_start|>`` and K = steps, so every step feeds a hidden state
back). Prints ms per loop step, generated tokens/s, batch speed-up over batch 1 and the
cost of a latent step relative to a text step (median of ``--repeats`` timed runs after one
compile run, and the fastest run; the variants' runs alternate, so load changes on a shared
host hit all of them alike) and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="untied_gqa2")
    ap.add_argument("--steps", type=int, default=128, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=48)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ilvr_jax import tiny
    from ilvr_jax.generate import Prompt, pad_prompts
    from ilvr_jax.generate.generation import decode_config
    from ilvr_jax.generate.sampler import bucket, cache_length, compiled
    from ilvr_jax.model import qwen25vl
    from ilvr_jax.model.config import ModelConfig

    tok = tiny.build_tokenizer()
    cfg = ModelConfig.from_hf(tiny.hf_config(tok, args.shape))
    params = jax.jit(qwen25vl.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    start = cfg.latent_start_token_id
    rng = np.random.RandomState(0)
    patch_dim = cfg.vision.patch_dim

    def prompts(b, latent):
        out = []
        for i in range(b):
            n = args.prompt_len - 3 * i % 11  # mixed lengths, one bucket
            ids = rng.randint(0, 300, n).astype(np.int32)
            if latent:
                ids[-1] = start
            out.append(Prompt(ids, np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int32)))
        return out

    def runner(b, mode):
        k = args.steps if mode == "latent" else 4
        dcfg = decode_config(tok, cfg, latent_size=k)
        pre, loop = compiled(cfg, dcfg)
        batch = pad_prompts(prompts(b, mode == "latent"), dcfg.pad_id, patch_dim=patch_dim)
        t = bucket(args.steps, 8)
        cache_len = cache_length(batch.input_ids.shape[1], t)
        budgets = jnp.full((b,), args.steps, jnp.int32)

        def run():
            logits, hidden, cache, deltas = pre(params, batch=batch, cache_len=cache_len)
            jax.block_until_ready(cache)
            t0 = time.perf_counter()
            out, _ = loop(params, max_steps=t, cache=cache, logits=logits, hidden=hidden, rope_deltas=deltas,
                          last_prompt_token=jnp.asarray(batch.input_ids[:, -1]), budgets=budgets,
                          stop_ids=jnp.asarray([-1], jnp.int32), key=jax.random.PRNGKey(0),
                          temperature=jnp.float32(0), top_k=jnp.int32(0), top_p=jnp.float32(1))
            jax.block_until_ready(out)
            return time.perf_counter() - t0, out

        return run

    load_before = os.getloadavg()
    variants = [(int(b), mode) for b in args.batches.split(",") for mode in ("text", "latent")]
    runs = {v: runner(*v) for v in variants}
    outs = {v: runs[v]()[1] for v in variants}  # compile
    for (b, mode), out in outs.items():  # every row generates exactly --steps tokens
        if int(out.steps) != args.steps or not np.all(np.asarray(out.num_generated) == args.steps):
            raise SystemExit(f"batch {b} {mode}: {int(out.steps)} steps, generated "
                             f"{np.asarray(out.num_generated).tolist()}, expected {args.steps}")
    times = {v: [] for v in variants}
    for _ in range(args.repeats):  # round-robin, so load changes on a shared host hit all variants alike
        for v in variants:
            times[v].append(runs[v]()[0])
    rows = []
    for (b, mode) in variants:
        out = outs[(b, mode)]
        steps = int(out.steps)
        fed = float(np.asarray(out.fed_hidden)[:, :steps].mean())
        sec = statistics.median(times[(b, mode)])
        best = min(times[(b, mode)])
        rows.append(dict(batch=b, mode=mode, ms_step=1e3 * sec / steps, tok_s=b * steps / sec, fed=fed,
                         best_tok_s=b * steps / best))
    load_after = os.getloadavg()

    print(f"\nDecode loop, tiny '{args.shape}' on {jax.devices()[0].platform}, {args.steps} new tokens per row, "
          f"prefill excluded (median of {args.repeats}; best = fastest run)\n"
          f"load average (1, 5, 15 min): before {_load(load_before)}, after {_load(load_after)}\n")
    print(f"{'batch':>5} {'mode':>7} {'ms/step':>9} {'tokens/s':>10} {'fed steps':>10} {'vs batch 1':>11} "
          f"{'best tok/s':>11} {'best vs 1':>10}")
    base = {r["mode"]: r["tok_s"] for r in rows if r["batch"] == 1}
    base_best = {r["mode"]: r["best_tok_s"] for r in rows if r["batch"] == 1}
    for r in rows:
        speedup = f"{r['tok_s'] / base[r['mode']]:.2f}x" if r["mode"] in base else "-"
        best_up = f"{r['best_tok_s'] / base_best[r['mode']]:.2f}x" if r["mode"] in base_best else "-"
        print(f"{r['batch']:>5} {r['mode']:>7} {r['ms_step']:>9.3f} {r['tok_s']:>10.0f} {r['fed']:>10.0%} "
              f"{speedup:>11} {r['best_tok_s']:>11.0f} {best_up:>10}")
    print()
    for b in sorted({r["batch"] for r in rows}):
        by = {r["mode"]: r for r in rows if r["batch"] == b}
        print(f"batch {b}: latent step / text step = {by['latent']['ms_step'] / by['text']['ms_step']:.2f}x")


def _load(avg) -> str:
    return ", ".join(f"{x:.1f}" for x in avg)


if __name__ == "__main__":
    main()
