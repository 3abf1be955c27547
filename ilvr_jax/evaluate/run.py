"""The evaluation program: records -> batched latent-mode generation -> scores -> summary.

:func:`evaluate` is what training (``train.eval_every``), the demo and the command line
(``python -m ilvr_jax.evaluate``) call. For every record it generates once normally and once
per requested latent ablation (``diagnostics``), scores the assistant turn with the data
set's scorer (``scorers``), and returns a summary: accuracy per mode, per task and per grid
size, and each ablation's accuracy change against the normal run with a paired bootstrap
interval.

With ``out_dir``, one JSON line per (record, mode) is appended to ``out_dir/samples.jsonl``
as soon as its batch is done (flushed), and ``out_dir/summary.json`` is written at the end;
a rerun with the same ``out_dir`` skips the (id, mode) pairs already there, so an
interrupted evaluation continues where it stopped (the summary counts the rows it found,
``resumed_rows``, and the (batch, mode) pairs it generated, ``generated_batches``).
``out_dir`` may be local or in cloud storage (``ilvr_jax.storage``).
Batches are formed over the records in order whatever is already done, so a resumed run
generates exactly what an uninterrupted one would. Every batch is padded to the
evaluation's longest prompt and largest question images (:func:`shape_floors`), so one
evaluation compiles one prefill and one decode loop per mode.

Multi-process: ``batch_size`` is the global batch, as in training. The records are cut
into global batches of ``batch_size`` rows; each process builds its ``batch_size /
process_count`` rows, the rows are put on the mesh's batch axes (``mesh``), outputs are
gathered to every process, and process 0 alone reads and writes ``out_dir``: the rows it
finds there are handed to the others, so every process skips the same batches and meets
the same collectives. The batches are those of one process with the same ``batch_size``
and mesh, so the generations are too. All processes must see the same records.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ilvr_jax import sharding, storage
from ilvr_jax.data import processor as proc
from ilvr_jax.data.records import LocatedRecord, RecordError, resolve_image_path
from ilvr_jax.evaluate import diagnostics, scorers
from ilvr_jax.generate.generation import Generation, decode_config, stop_token_ids, unpack
from ilvr_jax.generate.prompts import Prompt, record_prompt
from ilvr_jax.generate.sampler import PromptBatch, generate_batch, pad_prompts
from ilvr_jax.generate.sampling import SamplingParams
from ilvr_jax.model.config import ModelConfig

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One record to evaluate: its id (unique in the evaluation), the record, where it came
    from (for errors), the root of its relative image paths, and its task / grid labels."""

    id: str
    record: Mapping[str, Any]
    where: str
    root: str | None
    task: str | None
    grid: str | None


def _grid_label(rec: Mapping[str, Any]) -> str | None:
    m = rec.get("map_desc")
    if isinstance(m, list) and m and all(isinstance(r, list) for r in m):
        return f"{len(m)}x{len(m[0])}"
    return None


def eval_items(records: Sequence[Mapping[str, Any] | LocatedRecord], *, path: str | None = None,
               root: str | None = None, limit: int | None = None) -> list[EvalItem]:
    """Records (dicts or ``read_jsonl``'s ``LocatedRecord``) -> :class:`EvalItem`, the first
    ``limit``. A record without ``id`` is named by its location; a repeated id is an error
    naming both records."""
    items: list[EvalItem] = []
    seen: dict[str, str] = {}
    for i, rec in enumerate(records):
        if limit is not None and len(items) >= limit:
            break
        if isinstance(rec, LocatedRecord):
            if isinstance(rec.record, RecordError):
                raise rec.record
            where, rec_root, rec = rec.where, rec.root, rec.record
        else:  # an adapter's record: named by its place in the sequence and its id
            where = f"{path or '<records>'} record {i + 1}"
            if isinstance(rec, Mapping) and rec.get("id") is not None:
                where += f" (id={rec['id']})"
            rec_root = root
        if not isinstance(rec, Mapping):
            raise RecordError(where, "wrong_type", f"record is a {type(rec).__name__}, not a JSON object")
        rid = str(rec["id"]) if rec.get("id") is not None else where
        if rid in seen:
            raise ValueError(f"{where}: id {rid!r} repeats the id of {seen[rid]}; evaluation ids must be unique")
        seen[rid] = where
        task = rec.get("task") if isinstance(rec.get("task"), str) else None
        items.append(EvalItem(rid, rec, where, rec_root, task, _grid_label(rec)))
    return items


# ----------------------------------------------------------------------------- samples file
def read_samples(path: str, *, repair: bool = True) -> list[dict[str, Any]]:
    """The rows of a samples file (local or in a bucket). The last line of a killed run may
    be cut short: it is dropped (a complete row missing only its newline gets the newline),
    in the file too when ``repair`` (rewritten whole), so appended rows start on a line of
    their own. Any other unreadable line is an error naming the file and line."""
    if not storage.isfile(path):
        return []
    data = storage.read_bytes(path)
    lines = data.split(b"\n")
    rows = []
    repaired = data
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        tail = n == len(lines)  # a non-empty last piece: the file does not end with a newline
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if tail:
                repaired = data[:len(data) - len(line)]
                break
            raise ValueError(f"{path}:line {n}: not valid JSON ({e}); remove the line or the file") from None
        if not isinstance(row, dict) or "id" not in row or "mode" not in row:
            raise ValueError(f"{path}:line {n}: a sample row needs 'id' and 'mode'")
        if tail:
            repaired = data + b"\n"
        rows.append(row)
    if repair and repaired != data:
        storage.write_bytes(path, repaired)
    return rows


def latent_spans(token_ids: np.ndarray, start_id: int, end_id: int) -> list[list[int]]:
    """[start, end] indices (in the generated tokens) of each latent span; end is -1 for a
    span still open when generation stopped."""
    spans, open_at = [], None
    for i, t in enumerate(np.asarray(token_ids).tolist()):
        if t == start_id and open_at is None:
            open_at = i
        elif t == end_id and open_at is not None:
            spans.append([open_at, i])
            open_at = None
    if open_at is not None:
        spans.append([open_at, -1])
    return spans


def _sample_row(item: EvalItem, mode: str, prompt_text: str, gen: Generation, scorer: Callable,
                cfg: ModelConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    answer, correct = scorer(gen.text, item.record)
    row = {"id": item.id, "mode": mode, "task": item.task, "grid": item.grid, "prompt": prompt_text,
           "output": gen.text, "answer": answer, "correct": bool(correct),
           "num_tokens": int(len(gen.token_ids)), "stopped": gen.stopped,
           "num_latents": int(len(gen.latent_positions)), "num_latent_spans": gen.num_latent_spans,
           "latent_spans": latent_spans(gen.token_ids, cfg.latent_start_token_id, cfg.latent_end_token_id)}
    row.update(extra or {})
    return row


# ----------------------------------------------------------------------------- summary
def _acc(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    c = sum(bool(r["correct"]) for r in rows)
    return {"accuracy": c / n if n else float("nan"), "correct": c, "count": n}


def summarize(items: Sequence[EvalItem], rows: Sequence[Mapping[str, Any]], modes: Sequence[str], *,
              n_resamples: int = 1000, seed: int = 0, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Accuracy per mode (overall, per task, per grid size) over ``items``, and for every
    ablation the paired difference to the normal run with a bootstrap interval (over the
    records that have both)."""
    by_key = {(r["id"], r["mode"]): r for r in rows}
    out: dict[str, Any] = {"num_records": len(items), "modes": {}, "config": dict(config or {})}
    normal = {it.id: by_key[(it.id, diagnostics.NORMAL)] for it in items if (it.id, diagnostics.NORMAL) in by_key}
    for mode in modes:
        mine = [by_key[(it.id, mode)] for it in items if (it.id, mode) in by_key]
        entry = _acc(mine)
        for label in ("task", "grid"):
            groups: dict[str, list] = collections.defaultdict(list)
            for r in mine:
                if r.get(label) is not None:
                    groups[r[label]].append(r)
            if groups:
                entry[f"by_{label}"] = {k: _acc(v) for k, v in sorted(groups.items())}
        if mode != diagnostics.NORMAL:
            paired = [r for r in mine if r["id"] in normal]
            entry["vs_normal"] = diagnostics.paired_bootstrap(
                [normal[r["id"]]["correct"] for r in paired], [r["correct"] for r in paired],
                n_resamples=n_resamples, seed=seed)
        out["modes"][mode] = entry
    return out


def format_table(summary: Mapping[str, Any]) -> str:
    """The summary as a plain-text table (one line per mode, then the normal run's groups)."""
    lines = [f"{'mode':<10} {'n':>6} {'accuracy':>9}  change vs normal [95% CI]"]
    for mode, e in summary["modes"].items():
        d = e.get("vs_normal")
        change = "" if d is None else (f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] pts"
                                       if d["n"] else "n/a")
        lines.append(f"{mode:<10} {e['count']:>6} {100 * e['accuracy']:>8.1f}%  {change}")
    normal = summary["modes"].get(diagnostics.NORMAL, {})
    for label in ("task", "grid"):
        for k, g in normal.get(f"by_{label}", {}).items():
            lines.append(f"  {label} {k:<12} {g['count']:>6} {100 * g['accuracy']:>8.1f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- batches
def shape_floors(items: Sequence[EvalItem], tokenizer, image_cfg: proc.ImageProcessorConfig) -> tuple[int, int, int]:
    """(longest prompt, most question patches, most question images) over ``items``, from
    the tokenizer and the image headers (no pixels decoded): padding every batch to them
    gives the whole evaluation one compiled shape, the same on every process."""
    longest, patches, images = 16, 0, 1
    for it in items:
        rec = it.record
        try:
            grids = [proc.image_grid_thw(*proc.image_size(resolve_image_path(p, it.root)), image_cfg)
                     for p in rec["image_input"]]
            n = len(proc.build_prompt_ids(tokenizer, rec["text_input"], grids, merge_size=image_cfg.merge_size))
        except Exception:
            # The record's own one-line error (missing image, bad placeholders, ...) from the prompt builder.
            record_prompt(rec, tokenizer, image_cfg, root=it.root, where=it.where)
            raise
        longest = max(longest, n)
        patches = max(patches, sum(proc.num_patches(g) for g in grids))
        images = max(images, len(grids))
    return longest, patches, images


def _padded_batch(prompts: Sequence[Prompt], pad_id: int, rows: int, patch_dim: int,
                  floors: tuple[int, int, int]) -> PromptBatch:
    """``pad_prompts`` to at least the evaluation's ``floors`` (see :func:`shape_floors`)."""
    real = bool(prompts)
    if not real:  # a process whose slice of the last batch is empty: filler rows only
        prompts = [Prompt(np.asarray([pad_id], np.int32), np.zeros((0, patch_dim), np.float32),
                          np.zeros((0, 3), np.int32))]
    length, patches, images = floors
    b = pad_prompts(list(prompts), pad_id, batch_size=rows, min_len=length, min_patches=patches,
                    min_images=images, patch_dim=patch_dim)
    if not real:
        mask = np.zeros_like(b.attention_mask)
        mask[:, -1] = 1
        b = b._replace(attention_mask=mask)
    return b


def _batch_ways(mesh) -> int:
    """Into how many parts the mesh's batch axes cut a batch."""
    axes = sharding.logical_to_spec(("batch",), mesh)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def params_on_mesh(params, cfg: ModelConfig, mesh):
    """A host parameter tree (numpy, the same on every process) -> global arrays laid out
    over ``mesh`` as training lays them out; each process fills only its own devices, so
    parameters that span processes need no transfer between them."""
    from ilvr_jax.model import qwen25vl

    axes = qwen25vl.param_axes(cfg)

    def put(names, x):
        x = np.asarray(x)
        s = sharding.named_sharding(mesh, names, x.shape)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(put, axes, params, is_leaf=lambda n: isinstance(n, tuple) and all(
        isinstance(a, (str, type(None))) for a in n))


def _to_mesh(tree, mesh):
    """Process-local rows -> global arrays split along the mesh's batch axes."""

    def put(x):
        if x is None:
            return None
        x = np.asarray(x)
        spec = sharding.named_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1))
        return jax.make_array_from_process_local_data(spec, x)

    return jax.tree.map(put, tree, is_leaf=lambda x: x is None or isinstance(x, np.ndarray))


def _shared_rows(samples_path: str, writer: bool) -> list[dict[str, Any]]:
    """The rows already in the samples file, read (and repaired) by the writing process and,
    with several processes, handed to all of them: each must skip exactly the batches the
    others skip, whether or not it sees the file (or sees it before the repair)."""
    if jax.process_count() == 1:
        return read_samples(samples_path, repair=writer)
    from ilvr_jax.train import distributed

    text = json.dumps(read_samples(samples_path, repair=True)) if jax.process_index() == 0 else ""
    return json.loads(distributed.broadcast_text(text))


def _gather(out):
    """A decode output whose rows live on several processes -> numpy on every process."""
    if jax.process_count() == 1:
        return out
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(out, tiled=True)


# ----------------------------------------------------------------------------- evaluate
def evaluate(params, model_cfg: ModelConfig, tokenizer, image_cfg: proc.ImageProcessorConfig,
             records: Sequence[Mapping[str, Any] | LocatedRecord], scorer: str | Callable, *,
             batch_size: int = 8, max_new_tokens: int = 512, ablations: Sequence[str] | str = (), seed: int = 0,
             out_dir: str | None = None, latent_size: int | None = None,
             sampling: SamplingParams | None = None, limit: int | None = None, n_resamples: int = 1000,
             mesh=None, progress: bool = True, config: Mapping[str, Any] | None = None,
             root: str | None = None, path: str | None = None, print_table: bool = False,
             image_loader: Callable[[str], Any] = proc.load_image,
             decode_kw: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Generates, scores and summarises ``records``; returns the summary (see the module doc).

    scorer: a data-set name of ``scorers.SCORERS`` or a function ``(output, record) ->
    (answer, correct)``. ablations: names from ``diagnostics.ABLATIONS`` (or
    ``"zeros,noise"``). sampling: greedy by default; its seed is replaced per batch by one
    derived from ``seed`` (the noise ablation draws from the same keys). ``config``: extra
    entries for the summary's ``config`` (e.g. the model and data paths). ``root`` / ``path``:
    image root and file name for dict records. With ``mesh``, ``params`` must already be
    placed on it; the batch's rows are split along its batch axes. ``decode_kw``: further
    ``DecodeConfig`` fields (e.g. ``dtype``).
    """
    ablations = diagnostics.parse_ablations(ablations)
    modes = (diagnostics.NORMAL,) + ablations
    score_fn = scorers.get_scorer(scorer) if isinstance(scorer, str) else scorer
    items = eval_items(records, path=path, root=root, limit=limit)
    if "shuffle" in ablations and len(items) < 2:
        raise ValueError("the shuffle ablation needs at least 2 records (each takes another record's latents)")
    sampling = sampling or SamplingParams()
    pi, pc = jax.process_index(), jax.process_count()
    if pc > 1 and mesh is None:
        raise ValueError(f"evaluation on {pc} processes needs the mesh the parameters live on")
    if batch_size < 1 or batch_size % pc:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of the {pc} processes "
                         "(it is the global batch; each process builds an equal share)")
    if mesh is not None:
        dp = _batch_ways(mesh)
        if batch_size % dp:
            raise ValueError(f"batch_size {batch_size} must be divisible by the mesh's batch axes (data x fsdp = {dp})")
    per_process = batch_size // pc
    writer = pi == 0 and out_dir is not None
    samples_path = storage.join(out_dir, SAMPLES_FILE) if out_dir is not None else None
    rows: list[dict[str, Any]] = _shared_rows(samples_path, writer) if samples_path else []
    resumed_rows = len(rows)
    done = {(r["id"], r["mode"]) for r in rows}
    stops = stop_token_ids(tokenizer, model_cfg)
    dcfgs = {m: decode_config(tokenizer, model_cfg, latent_size=latent_size, sampling=sampling, **dict(decode_kw or {}),
                              **({} if m == diagnostics.NORMAL else {"latent_ablation": m})) for m in modes}
    pad_id = dcfgs[diagnostics.NORMAL].pad_id
    dim = model_cfg.text.hidden_size
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    todo = [(c, m) for c, chunk in enumerate(chunks) for m in modes if any((it.id, m) not in done for it in chunk)]
    # Custom loaders (in-memory images) have no headers to read: their batches bucket alone.
    floors = shape_floors(items, tokenizer, image_cfg) if todo and image_loader is proc.load_image else (16, 0, 1)

    prompt_cache: dict[int, tuple[list[Prompt], list[str]]] = {}

    def prompts_of(c: int):
        if c not in prompt_cache:
            local = chunks[c][pi * per_process:(pi + 1) * per_process]
            ps = [record_prompt(it.record, tokenizer, image_cfg, root=it.root, where=it.where,
                                image_loader=image_loader) for it in local]
            texts = [proc.build_prompt_text(tokenizer, it.record["text_input"], len(it.record["image_input"]))
                     for it in local]
            prompt_cache.clear()
            prompt_cache[c] = (ps, texts)
        return prompt_cache[c]

    def run(c: int, mode: str, donors=None) -> list[Generation]:
        ps, _ = prompts_of(c)
        batch = _padded_batch(ps, pad_id, per_process, model_cfg.vision.patch_dim, floors)
        budgets = np.zeros((batch_size,), np.int32)  # host-side: the loop length is read from them
        budgets[: len(chunks[c])] = max_new_tokens
        source = donors
        if mesh is not None:
            batch = _to_mesh(batch, mesh)
            source = _to_mesh(donors, mesh) if donors is not None else None
        kw = {"latent_source": source} if source is not None else {}
        batch_sampling = dataclasses.replace(sampling, seed=(seed * 1_000_003 + c) % (2 ** 31))
        with sharding.activation_mesh(mesh):  # the model's activation constraints, as in training
            out = generate_batch(params, model_cfg, dcfgs[mode], batch, budgets, stops, batch_sampling, **kw)
        out = _gather(out)
        return unpack(out, len(chunks[c]), tokenizer)

    normal_cache: dict[int, list[Generation]] = {}

    def normal_of(c: int) -> list[Generation]:
        if c not in normal_cache:
            if len(normal_cache) >= 3:
                normal_cache.pop(min(normal_cache))
            normal_cache[c] = run(c, diagnostics.NORMAL)
        return normal_cache[c]

    def shuffle_sources(c: int):
        """Donor latents for this process's rows of chunk c, and the donor ids of all rows."""
        chunk = chunks[c]
        if len(chunk) >= 2:
            gens = normal_of(c)
            donor_idx = diagnostics.shuffle_donors(len(chunk))
            lat = [g.latents for g in gens]
            ids = [chunk[d].id for d in donor_idx]
        else:  # one row: the previous batch's last row (the next batch's first for the first)
            d = c - 1 if c > 0 else c + 1
            lat, ids, donor_idx = [normal_of(d)[-1 if c > 0 else 0].latents], [chunks[d][-1 if c > 0 else 0].id], [0]
        mine = list(donor_idx)[pi * per_process:(pi + 1) * per_process]
        longest = max(len(lat[d]) for d in donor_idx)  # over all rows: every process compiles one shape
        return diagnostics.donor_arrays(lat, mine, per_process, dim, length=longest), ids

    bar = None
    if progress and pi == 0 and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="eval", unit="batch")
    t0 = time.time()
    f = None
    if writer:
        storage.makedirs(out_dir)
        f = storage.AppendFile(samples_path)   # in a bucket: the object rewritten at each flush
    try:
        for c, mode in todo:
            extra = [{} for _ in chunks[c]]
            if mode == diagnostics.NORMAL:
                gens = normal_of(c)
            elif mode == "shuffle":
                source, donor_ids = shuffle_sources(c)
                gens = run(c, mode, source)
                extra = [{"donor": d} for d in donor_ids]
            else:
                gens = run(c, mode)
            texts = prompts_of(c)[1] if pc == 1 else [
                proc.build_prompt_text(tokenizer, it.record["text_input"], len(it.record["image_input"]))
                for it in chunks[c]]
            for it, text, g, ex in zip(chunks[c], texts, gens, extra):
                if (it.id, mode) in done:
                    continue
                row = _sample_row(it, mode, text, g, score_fn, model_cfg, ex)
                rows.append(row)
                done.add((it.id, mode))
                if f is not None:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if f is not None:
                f.flush()
            if bar is not None:
                bar.update(1)
    finally:
        if f is not None:
            f.close()
        if bar is not None:
            bar.close()
    cfg_entry = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, ablations=list(ablations), seed=seed,
                     latent_size=dcfgs[diagnostics.NORMAL].latent_size, n_resamples=n_resamples,
                     scorer=scorer if isinstance(scorer, str) else getattr(scorer, "__name__", "custom"),
                     sampling=dataclasses.asdict(sampling), limit=limit, processes=pc)
    cfg_entry.update(config or {})
    summary = summarize(items, rows, modes, n_resamples=n_resamples, seed=seed, config=cfg_entry)
    summary["resumed_rows"] = resumed_rows          # rows of an earlier run, not generated again
    summary["generated_batches"] = len(todo)       # (batch, mode) pairs this run generated
    summary["seconds"] = round(time.time() - t0, 3)
    if writer:
        storage.write_text(storage.join(out_dir, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    if print_table and pi == 0:
        print(format_table(summary))
    return summary
