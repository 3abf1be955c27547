"""Evaluation commands.

    python -m ilvr_jax.evaluate --model RUN_OR_HF_DIR [--step N] [--teacher] --data FILE
        --adapter canonical|comt|vsp|zebra|maze [--scorer comt|vsp|maze|zebra] --out DIR
        [--batch-size 8] [--max-new-tokens 512] [--seed 0] [--limit N] [--ablate zeros,pad,shuffle,noise]
        [--mesh DATA,FSDP,TENSOR] [--distributed [--coordinator-address H:P --num-processes N --process-id I]]
    python -m ilvr_jax.evaluate heatmap --model M --data FILE --out DIR [--ids a,b] [--limit N]
    python -m ilvr_jax.evaluate selection --model RUN --data FILE --out DIR [--ids a,b] [--limit N]

The first writes ``DIR/samples.jsonl`` (one row per record and mode, resumable) and
``DIR/summary.json`` and prints a table. Every path may be local or in cloud storage
(``gs://...``, through ``ilvr_jax.storage``). ``--mesh DATA,FSDP,TENSOR`` lays the parameters
and the batch's rows over the devices as training does. Several processes (one per host, or
several on one machine) run the same command with ``--distributed`` (and, where jax cannot
detect the cluster, ``--coordinator-address``, ``--num-processes``, ``--process-id``, as the
training config's ``mesh.*`` keys): ``--batch-size`` is then the global batch, each process
generates its share, and process 0 writes the files; the results are those of one process
with the same batch size and mesh. ``heatmap`` draws, per sample, the cosine of every
generated latent with the question and helper image patch features; ``selection`` draws the
patches the momentum teacher selects per latent segment over each helper image (both run in
one process).
"""

from __future__ import annotations

import argparse
import sys

from ilvr_jax import storage
from ilvr_jax.data.adapters import ADAPTER_NAMES
from ilvr_jax.evaluate.scorers import SCORERS


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="training workdir, checkpoint step dir, or HF directory (an export or a stock download)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a training workdir (default: newest)")
    p.add_argument("--teacher", action="store_true", help="use the run's momentum teacher instead of the student")
    p.add_argument("--data", required=True, help="records (JSONL file or the adapter's source)")
    p.add_argument("--adapter", default="canonical", choices=ADAPTER_NAMES, help="how to read --data")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--latent-size", type=int, default=None, help="K (default: the model config's latent_size)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ilvr_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    p.add_argument("--scorer", default=None, choices=sorted(SCORERS),
                   help="answer scorer (default: the adapter's data set)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="seeds sampling, the noise ablation and the bootstrap")
    p.add_argument("--ablate", default="", help="latent ablations to run besides the normal run: "
                   "comma-separated from zeros,pad,shuffle,noise")
    p.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples of the ablation intervals")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mesh", default="", help="DATA,FSDP,TENSOR device mesh (-1 = the remaining devices); "
                   "default: one device, or 1,-1,1 with --distributed")
    d = p.add_argument_group("several processes (as the mesh.* keys of training)")
    d.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    d.add_argument("--coordinator-address", default="", help="host:port of process 0 ('' = auto-detect)")
    d.add_argument("--num-processes", type=int, default=-1, help="-1 = auto-detect")
    d.add_argument("--process-id", type=int, default=-1, help="-1 = auto-detect")
    d.add_argument("--local-device-ids", default="", help="comma-separated local device ids ('' = all)")
    return p


def _mesh(args: argparse.Namespace):
    """The ``--mesh`` device mesh (None: one device, the single-process default)."""
    import jax

    text = args.mesh or ("1,-1,1" if jax.process_count() > 1 else "")
    if not text:
        return None
    from ilvr_jax.train.mesh import make_mesh

    try:
        shape = [int(x) for x in text.replace("(", "").replace(")", "").split(",")]
    except ValueError:
        raise ValueError(f"--mesh {args.mesh!r}: expected three comma-separated integers DATA,FSDP,TENSOR") from None
    return make_mesh(shape)


def _heatmap_parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m ilvr_jax.evaluate {name}")
    _model_args(p)
    p.add_argument("--ids", default=None, help="comma-separated record ids (default: every record, up to --limit)")
    if name == "heatmap":
        p.add_argument("--max-new-tokens", type=int, default=256)
    else:
        p.add_argument("--num-candidates", type=int, default=256, help="L, candidates per helper image")
        p.add_argument("--top-p", type=float, default=0.9, help="p, the selection's probability coverage")
    return p


def _evaluate(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from ilvr_jax.evaluate import loading
    from ilvr_jax.evaluate.run import evaluate, params_on_mesh
    from ilvr_jax.generate.sampling import SamplingParams

    scorer = args.scorer or loading.ADAPTER_SCORERS.get(args.adapter)
    if scorer is None:
        raise ValueError(f"--adapter {args.adapter} does not say how answers are scored: pass --scorer "
                         f"({', '.join(sorted(set(loading.ADAPTER_SCORERS.values())))})")
    if args.distributed:
        from ilvr_jax.train import distributed

        try:
            distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                                   args.local_device_ids)
        except distributed.DistributedInitError as e:
            raise ValueError(f"--distributed: {e}") from None
    import jax

    mesh = _mesh(args)
    records = loading.load_records(args.data, args.adapter, work_dir=args.out)
    m = loading.load_model(args.model, step=args.step, teacher=args.teacher)
    params = m.params if mesh is None else params_on_mesh(m.params, m.cfg, mesh)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    config = dict(model=m.source, step=args.step, teacher=args.teacher, data=storage.abspath(args.data),
                  adapter=args.adapter, dtype=args.dtype, mesh=None if mesh is None else list(mesh.shape.values()))
    evaluate(params, m.cfg, m.tokenizer, m.image_cfg, records, scorer, batch_size=args.batch_size,
             max_new_tokens=args.max_new_tokens, ablations=args.ablate, seed=args.seed, out_dir=args.out,
             latent_size=args.latent_size, sampling=sampling, limit=args.limit, n_resamples=args.n_resamples,
             progress=not args.no_progress, config=config, path=args.data, print_table=True, mesh=mesh,
             decode_kw={"dtype": jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32})
    if jax.process_index() == 0:
        print(f"wrote {storage.join(args.out, 'samples.jsonl')} and {storage.join(args.out, 'summary.json')}")
    return 0


def _heatmaps(name: str, args: argparse.Namespace) -> int:
    from ilvr_jax.evaluate import heatmaps, loading

    records = loading.load_records(args.data, args.adapter, work_dir=args.out)
    ids = [s for s in args.ids.split(",") if s] if args.ids else None
    m = loading.load_model(args.model, step=args.step, teacher=args.teacher or name == "selection"
                           and _is_run(args.model))
    if name == "heatmap":
        paths = heatmaps.latent_heatmaps(m.params, m.cfg, m.tokenizer, m.image_cfg, records, args.out, ids=ids,
                                         limit=args.limit, latent_size=args.latent_size,
                                         max_new_tokens=args.max_new_tokens, path=args.data)
    else:
        paths = heatmaps.selection_overlays(m.params, m.cfg, m.tokenizer, m.image_cfg, records, args.out, ids=ids,
                                            limit=args.limit, latent_size=args.latent_size,
                                            num_candidates=args.num_candidates, top_p=args.top_p, path=args.data)
    for p in paths:
        print(p)
    print(f"wrote {len(paths)} PNG file(s) under {args.out}")
    return 0


def _is_run(model: str) -> bool:
    from ilvr_jax import convert

    return convert.is_training_checkpoint(model)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("heatmap", "selection"):
            return _heatmaps(argv[0], _heatmap_parser(argv[0]).parse_args(argv[1:]))
        return _evaluate(_parser().parse_args(argv))
    except (FileNotFoundError, ValueError, storage.StorageError) as e:
        # Bad input (a record, a file, an option): one line naming it, no traceback.
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
