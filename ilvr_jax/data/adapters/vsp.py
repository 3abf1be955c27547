"""VSP spatial planning (FrozenLake) JSONL -> canonical records that keep ``map_desc``.

Input record (one JSON object per line; image paths relative to ``image_root``, default the
JSONL's directory)::

    {"id": ..., "text_input": "...", "image_input": ["q.png"],
     "map_desc": [[1, 0, -1], [0, 0, 0], [-1, 0, 2]],     # 1 start, 2 goal, 0 safe, -1 hole
     "helper_images": ["s1.png", "s2.png", ...],          # board after each move, or ...
     "sequence_plan": [...],                               # ... a canonical plan (either or both)
     "step_texts": ["...", ...],                           # optional, one text per helper image
     "original_final_answer": "\\boxed{R,D,D,R}"}          # or "answer"

* The plan: ``sequence_plan`` when present (with ``helper_images`` too, they must agree);
  otherwise built from ``helper_images`` as ``text_k, latent(helper_k)`` pairs, where
  ``text_k`` is ``step_texts[k]`` or, without ``step_texts``, ``"Move k: from (r, c) go
  right to (r, c+1)."`` derived from the answer's moves (then the number of helper images must
  equal the number of moves: ``helper_count`` error otherwise).
* The answer: ``original_final_answer`` (or ``answer``) holding the moves in ``\\boxed{}``
  (``L,D,R``, ``L D R``, ``LDR``, ``left, down, right``, arrows; see ``maze.parse_moves``) or
  a bare move string without ``\\boxed``. It is rewritten as ``\\boxed{L,D,R}``.
* ``check_solution`` (default True): the answer must walk from start to goal
  (``wrong_solution`` error otherwise).

Output: the canonical record with absolute image paths plus ``map_desc``; ``task`` defaults to
``"vsp"`` (``"maze"`` for :func:`iter_maze_records`). Other extra keys are kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from ilvr_jax import storage
from ilvr_jax.data import maze
from ilvr_jax.data.adapters import absolute_paths
from ilvr_jax.data.adapters.comt import jsonl_files
from ilvr_jax.data.records import (
    HELPER_COUNT,
    MISSING_KEY,
    WRONG_TYPE,
    DropPolicy,
    RecordError,
    latent_step,
    read_jsonl,
    text_step,
    validate_record,
)

BAD_MAP = "bad_map"
BAD_ANSWER = "bad_answer"
WRONG_SOLUTION = "wrong_solution"


def _answer_moves(answer: str) -> list[str] | None:
    if maze.extract_boxed(answer) is not None:
        return maze.parse_answer(answer)
    return maze.parse_moves(answer)


def convert_record(raw: Any, root: str | os.PathLike | None, *, where: str, check_images: bool = True,
                   check_solution: bool = True, task: str = "vsp") -> dict:
    """One VSP record -> a validated canonical record (absolute paths, ``map_desc`` kept).

    Raises ``RecordError`` (reasons ``bad_map``, ``bad_answer``, ``wrong_solution``,
    ``helper_count`` and those of ``validate_record``) naming ``where``.
    """
    if not isinstance(raw, Mapping):
        raise RecordError(where, WRONG_TYPE, f"record must be a JSON object, got {type(raw).__name__}")
    rec = dict(raw)
    if "map_desc" not in rec:
        raise RecordError(where, MISSING_KEY, "missing key 'map_desc'")
    try:
        maze.check_map(rec["map_desc"])
    except ValueError as e:
        raise RecordError(where, BAD_MAP, str(e)) from None

    if "original_final_answer" not in rec:
        if "answer" not in rec:
            raise RecordError(where, MISSING_KEY, "missing key 'original_final_answer' (or 'answer')")
        rec["original_final_answer"] = rec.pop("answer")
    answer = rec["original_final_answer"]
    if not isinstance(answer, str):
        raise RecordError(where, WRONG_TYPE, f"answer must be a string, got {type(answer).__name__}")
    moves = _answer_moves(answer)
    if moves is None:
        raise RecordError(where, BAD_ANSWER, f"answer {answer!r} is not a move sequence (L/R/U/D)")
    if check_solution:
        result = maze.simulate(rec["map_desc"], moves)
        if not result.success:
            raise RecordError(where, WRONG_SOLUTION,
                              f"answer {answer!r} does not reach the goal ({result.outcome} after "
                              f"{result.moves_used} moves)")
    rec["original_final_answer"] = maze.format_answer(moves)

    if "sequence_plan" not in rec:
        helpers = rec.get("helper_images")
        if helpers is None:
            raise RecordError(where, MISSING_KEY, "needs 'sequence_plan' or 'helper_images'")
        if not isinstance(helpers, list) or not all(isinstance(p, str) for p in helpers):
            raise RecordError(where, WRONG_TYPE, "'helper_images' must be a list of path strings")
        texts = rec.pop("step_texts", None)
        if texts is not None:
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise RecordError(where, WRONG_TYPE, "'step_texts' must be a list of strings")
            if len(texts) != len(helpers):
                raise RecordError(where, HELPER_COUNT,
                                  f"{len(texts)} step_texts for {len(helpers)} helper images")
        else:
            if len(moves) != len(helpers):
                raise RecordError(where, HELPER_COUNT,
                                  f"{len(helpers)} helper images for {len(moves)} moves")
            texts = maze.plan_texts(rec["map_desc"], moves)
        plan = []
        for text, helper in zip(texts, helpers):
            plan.append(text_step(text))
            plan.append(latent_step(helper))
        rec["sequence_plan"] = plan
    rec.setdefault("image_input", [])
    validate_record(rec, root, where=where, check_images=check_images)
    rec.pop("helper_images", None)  # equal to the plan's latent steps (checked above)
    rec = absolute_paths(rec, root)
    if rec.get("task") is None:
        rec["task"] = task
    return rec


def iter_records(
    source: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    policy: DropPolicy | None = None,
    check_images: bool = True,
    check_solution: bool = True,
    task: str = "vsp",
) -> Iterator[dict]:
    """Yields canonical records (with ``map_desc``) from a VSP JSONL file or directory."""
    policy = policy if policy is not None else DropPolicy("error")
    for path in jsonl_files(source):
        for loc in read_jsonl(path, image_root):
            try:
                if isinstance(loc.record, RecordError):
                    raise loc.record
                rec = convert_record(loc.record, loc.root, where=loc.where, check_images=check_images,
                                     check_solution=check_solution, task=task)
            except RecordError as e:
                policy.handle(e)
                continue
            yield rec


def iter_maze_records(
    source: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    policy: DropPolicy | None = None,
    check_images: bool = True,
    check_solution: bool = True,
) -> Iterator[dict]:
    """Records of a data set written by ``maze.generate_maze_dataset`` (``source`` is its
    directory, whose ``data.jsonl`` is read, or a JSONL file); solutions are checked by
    simulation."""
    default_file = storage.join(os.fspath(source), "data.jsonl")
    if storage.isdir(source) and storage.isfile(default_file):
        source = default_file
    yield from iter_records(source, image_root=image_root, policy=policy, check_images=check_images,
                            check_solution=check_solution, task="maze")
