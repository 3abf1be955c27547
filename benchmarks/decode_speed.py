"""Decode speed of the compiled latent-mode loop on the tiny model (CPU by default).

    python benchmarks/decode_speed.py [--shape untied_gqa2] [--steps 128] [--repeats 5] [--batches 1,8]
                                      [--no-attention]

For each batch size: the decode loop alone (prefill excluded) over exactly ``--steps``
tokens per row (no stop token), in text mode (prompts end in text) and in latent mode
(prompts end with ``<|latent_start|>`` and K = steps, so every step feeds a hidden state
back). Prints ms per loop step, generated tokens/s, batch speed-up over batch 1, the
multiply-adds per second the step sustains (the model's matmuls and the attention over the
cache, per generated token, times tokens/s) and the cost of a latent step relative to a
text step (median of ``--repeats`` timed runs after one compile run, and the fastest run;
the variants' runs alternate, so load changes on a shared host hit all of them alike) and
the load average before and after.

``--no-attention`` adds a measurement-only text-mode variant whose decode steps replace the
cached attention by a stand-in that returns the queries (the cache writes stay: the buffers
are carried through the loop): the cost of everything but the attention, the floor of the
step time that a faster attention could reach. Its tokens are not the model's.
"""

from __future__ import annotations

import argparse
import functools
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
    ap.add_argument("--no-attention", action="store_true",
                    help="also time text mode with the attention replaced by a stand-in (measurement only)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ilvr_jax import tiny
    from ilvr_jax.generate import Prompt, cached_step, pad_prompts, sampler
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

        def loop_args():
            logits, hidden, cache, deltas = pre(params, batch=batch, cache_len=cache_len)
            jax.block_until_ready(cache)
            return dict(cache=cache, logits=logits, hidden=hidden, rope_deltas=deltas,
                        last_prompt_token=jnp.asarray(batch.input_ids[:, -1]), budgets=budgets,
                        stop_ids=jnp.asarray([-1], jnp.int32), key=jax.random.PRNGKey(0),
                        temperature=jnp.float32(0), top_k=jnp.int32(0), top_p=jnp.float32(1))

        if mode == NO_ATTENTION:
            loop = _without_attention(jax, sampler, cached_step, cfg, dcfg, params, t, loop_args())
        else:
            loop = functools.partial(loop, max_steps=t)

        def run():
            a = loop_args()
            t0 = time.perf_counter()
            out, _ = loop(params, **a)
            jax.block_until_ready(out)
            return time.perf_counter() - t0, out

        return run, cache_len

    load_before = os.getloadavg()
    modes = ("text", "latent") + ((NO_ATTENTION,) if args.no_attention else ())
    variants = [(int(b), mode) for b in args.batches.split(",") for mode in modes]
    runs, slots = {}, {}
    for v in variants:
        runs[v], slots[v] = runner(*v)
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
        macs = _macs_per_token(cfg.text, slots[(b, mode)], attention=mode != NO_ATTENTION)
        rows.append(dict(batch=b, mode=mode, ms_step=1e3 * sec / steps, tok_s=b * steps / sec, fed=fed,
                         best_tok_s=b * steps / best, gmac_s=macs * b * steps / sec / 1e9))
    load_after = os.getloadavg()

    print(f"\nDecode loop, tiny '{args.shape}' on {jax.devices()[0].platform}, {args.steps} new tokens per row, "
          f"prefill excluded (median of {args.repeats}; best = fastest run)\n"
          f"load average (1, 5, 15 min): before {_load(load_before)}, after {_load(load_after)}\n")
    print(f"{'batch':>5} {'mode':>12} {'ms/step':>9} {'tokens/s':>10} {'GMAC/s':>7} {'fed steps':>10} "
          f"{'vs batch 1':>11} {'best tok/s':>11} {'best vs 1':>10}")
    base = {r["mode"]: r["tok_s"] for r in rows if r["batch"] == 1}
    base_best = {r["mode"]: r["best_tok_s"] for r in rows if r["batch"] == 1}
    for r in rows:
        speedup = f"{r['tok_s'] / base[r['mode']]:.2f}x" if r["mode"] in base else "-"
        best_up = f"{r['best_tok_s'] / base_best[r['mode']]:.2f}x" if r["mode"] in base_best else "-"
        print(f"{r['batch']:>5} {r['mode']:>12} {r['ms_step']:>9.3f} {r['tok_s']:>10.0f} {r['gmac_s']:>7.1f} "
              f"{r['fed']:>10.0%} {speedup:>11} {r['best_tok_s']:>11.0f} {best_up:>10}")
    print()
    for b in sorted({r["batch"] for r in rows}):
        by = {r["mode"]: r for r in rows if r["batch"] == b}
        print(f"batch {b}: latent step / text step = {by['latent']['ms_step'] / by['text']['ms_step']:.2f}x")


NO_ATTENTION = "no-attention"


def _macs_per_token(tcfg, slots: int, *, attention: bool) -> int:
    """Multiply-adds of one decode step per row: the layers' projections and MLP, the
    attention's score and value products over all ``slots`` cache slots (every step attends
    over the whole cache) and the vocabulary projection."""
    d, inter, hd = tcfg.hidden_size, tcfg.intermediate_size, tcfg.head_dim
    hq, hkv = tcfg.num_attention_heads, tcfg.num_key_value_heads
    per_layer = 2 * d * hq * hd + 2 * d * hkv * hd + 3 * d * inter + (2 * hq * hd * slots if attention else 0)
    return tcfg.num_hidden_layers * per_layer + d * tcfg.vocab_size


def _without_attention(jax, sampler, cached_step, cfg, dcfg, params, max_steps, loop_args):
    """The decode loop compiled with ``cached_step.cached_attention`` replaced by a stand-in
    that returns the queries: every other op of the step stays, the cache writes too (the
    buffers are carried through the loop and returned). Measurement only."""

    def stand_in(q, keys, values, valid):
        return q.astype("float32")

    real_attention = cached_step.cached_attention
    fn = jax.jit(functools.partial(sampler.decode_loop, cfg=cfg, dcfg=dcfg, max_steps=max_steps),
                 donate_argnames=("cache",))
    cached_step.cached_attention = stand_in
    try:
        return fn.lower(params, **loop_args).compile()
    finally:
        cached_step.cached_attention = real_attention


def _load(avg) -> str:
    return ", ".join(f"{x:.1f}" for x in avg)


if __name__ == "__main__":
    main()
