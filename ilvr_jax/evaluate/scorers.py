"""Answer scoring: one pure function per data set, ``(model output text, record) -> (answer, correct)``.

Every scorer reads the assistant turn only (:func:`assistant_turn`): when the output still
holds the prompt, everything up to the last ``<|im_start|>assistant`` is dropped, the turn
ends at its ``<|im_end|>``, and special tokens (latent, vision, end markers) are removed, so
a ``\\boxed{}`` in the question never counts. The extracted answer is ``None`` when the
output has none that can be read, and such an output is wrong.

* ``comt``: option letters A-D. The last ``\\boxed{}`` decides if there is one; otherwise the
  last explicit answer phrase ("Answer: B", "the answer is (C)"), then the last "(B)" /
  "B." / "Option B", then a turn that is a bare letter. Compared with the letter read the
  same way from the record's ``original_final_answer``. (The released eval compares the
  rest of the "answer:" line verbatim, so "Answer: B. because ..." is wrong there and right
  here.)
* ``vsp`` / ``maze``: the moves in the last ``\\boxed{}`` (``maze.parse_moves``) walked on
  the record's ``map_desc`` (``maze.simulate``): correct iff the walk reaches the goal
  without entering a hole or leaving the board. The released eval instead skips off-board
  moves and only looks at the final cell; the FrozenLake rule here is the stricter one.
* ``zebra``: normalised exact match of the last ``\\boxed{}`` or, without one, the last
  "final answer" phrase, against ``original_final_answer`` (normalised the same way).

A record whose reference answer cannot be read raises ``ValueError`` naming the record.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from ilvr_jax.data import maze

Score = tuple[str | None, bool]
Scorer = Callable[[str, Mapping[str, Any]], Score]

OPTION_LETTERS = "ABCD"
ASSISTANT_MARKER = "<|im_start|>assistant"
TURN_END = "<|im_end|>"
# Tokens that can appear in decoded output and are never part of an answer.
SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|latent_pad|>", "<|latent_start|>", "<|latent_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>",
)


def _where(record: Mapping[str, Any]) -> str:
    rid = record.get("id") if isinstance(record, Mapping) else None
    return f"record {rid!r}" if rid is not None else "record"


def assistant_turn(text: str) -> str:
    """The assistant's reply inside ``text``: after the last ``<|im_start|>assistant``
    (if any), up to the first ``<|im_end|>`` after it, special tokens removed."""
    if not isinstance(text, str):
        return ""
    k = text.rfind(ASSISTANT_MARKER)
    if k >= 0:
        text = text[k + len(ASSISTANT_MARKER):]
    end = text.find(TURN_END)
    if end >= 0:
        text = text[:end]
    for tok in SPECIAL_TOKENS:
        text = text.replace(tok, "")
    return text.strip()


# --------------------------------------------------------------------------------------------
# CoMT: option letters
# --------------------------------------------------------------------------------------------

_L = f"[{OPTION_LETTERS}]"
_LATEX_WRAP = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}")
# A whole string that is one letter: "B", "(B)", "B.", "B)", "Option B", "B: the red one".
_LETTER_ALONE = re.compile(
    rf"^\s*(?:option|choice)?\s*[(\[]?\s*({_L})\s*[)\]]?\s*(?:[.:)]\s*.*)?$", re.IGNORECASE | re.DOTALL)
# Letters are upper case outside a box, so that "the answer is a cat" reads no letter.
_ANSWER_PHRASE = re.compile(
    rf"(?i:answer)\s*(?i:is|would\s+be|should\s+be)?\s*[:：]?\s*(?i:option|choice)?\s*[(\[]?\s*"
    rf"({_L})(?![A-Za-z0-9])")
_LETTER_MARKED = re.compile(
    rf"\(({_L})\)|\[({_L})\]|\b(?:[Oo]ption|[Cc]hoice)\s+({_L})\b|(?<![A-Za-z])({_L})[.)](?=\s|$)")


def _unwrap_latex(s: str) -> str:
    prev = None
    while prev != s:
        prev, s = s, _LATEX_WRAP.sub(r"\1", s)
    return s


def option_letter(text: str) -> str | None:
    """The option letter a reply gives (see the module doc for the order), or None."""
    turn = assistant_turn(text)
    boxed = maze.extract_boxed(turn)
    if boxed is not None:
        m = _LETTER_ALONE.match(_unwrap_latex(boxed))
        return m.group(1).upper() if m else None
    for pattern in (_ANSWER_PHRASE, _LETTER_MARKED):
        matches = list(pattern.finditer(turn))
        if matches:
            last = matches[-1]
            return next(g for g in last.groups() if g).upper()
    m = re.fullmatch(rf"\s*({_L})\s*\.?\s*", turn, re.IGNORECASE)
    return m.group(1).upper() if m else None


def _reference_letter(record: Mapping[str, Any]) -> str:
    gold = record.get("original_final_answer") if isinstance(record, Mapping) else None
    if not isinstance(gold, str):
        raise ValueError(f"{_where(record)}: original_final_answer must be a string, got {type(gold).__name__}")
    letter = option_letter(gold)
    if letter is None:
        raise ValueError(f"{_where(record)}: original_final_answer {gold!r} is not an option letter "
                         f"({', '.join(OPTION_LETTERS)})")
    return letter


def score_comt(output: str, record: Mapping[str, Any]) -> Score:
    """CoMT multiple choice: the reply's option letter against the record's."""
    gold = _reference_letter(record)
    pred = option_letter(output)
    return pred, pred == gold


# --------------------------------------------------------------------------------------------
# VSP and mazes: simulate the moves
# --------------------------------------------------------------------------------------------


def score_vsp(output: str, record: Mapping[str, Any]) -> Score:
    """VSP / maze: the moves in the last ``\\boxed{}`` must walk from start to goal."""
    map_desc = record.get("map_desc") if isinstance(record, Mapping) else None
    if map_desc is None:
        raise ValueError(f"{_where(record)}: missing key 'map_desc' (needed to simulate the answer)")
    try:
        maze.check_map(map_desc)
    except ValueError as e:
        raise ValueError(f"{_where(record)}: bad map_desc: {e}") from None
    moves = maze.parse_answer(assistant_turn(output))
    if moves is None:
        return None, False
    return ",".join(moves), maze.simulate(map_desc, moves).success


# --------------------------------------------------------------------------------------------
# Zebra-CoT: normalised exact match
# --------------------------------------------------------------------------------------------

_FINAL_ANSWER = re.compile(
    r"final\s*answer\s*(?:\*\*)?\s*(?:is\b)?\s*(?:\*\*)?\s*[:：]?\s*(?:\*\*)?[ \t]*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def final_answer_text(text: str) -> str | None:
    """The last ``\\boxed{}`` of the assistant turn or, without one, the rest of the line
    after its last "final answer" (case-insensitive); None if there is neither."""
    turn = assistant_turn(text)
    boxed = maze.extract_boxed(turn)
    if boxed is not None:
        return boxed
    matches = list(_FINAL_ANSWER.finditer(turn))
    if not matches:
        return None
    answer = matches[-1].group(1).strip().strip("*").strip()
    return answer or None


def normalize_answer(answer: str) -> str:
    """Case, surrounding whitespace, ``$`` and a trailing period dropped, ``\\text{}``
    unwrapped, thousands separators removed and numbers written canonically
    (``"3.0"`` -> ``"3"``, ``"1,000"`` -> ``"1000"``, ``"0.50"`` -> ``"0.5"``)."""
    s = _unwrap_latex(answer).strip()
    prev = None
    while prev != s:
        prev = s
        s = s.strip().strip("$").strip()
        if s.endswith(".") and not _NUMBER.fullmatch(s):
            s = s[:-1]
    s = " ".join(s.split()).lower()
    s = _THOUSANDS.sub("", s)
    if _NUMBER.fullmatch(s):
        try:
            d = Decimal(s)
        except InvalidOperation:
            return s
        if d == d.to_integral_value():
            return str(int(d))
        return format(d.normalize(), "f")
    return s


def score_zebra(output: str, record: Mapping[str, Any]) -> Score:
    """Zebra-CoT: normalised exact match of the final answer."""
    gold = record.get("original_final_answer") if isinstance(record, Mapping) else None
    if not isinstance(gold, str) or not gold.strip():
        raise ValueError(f"{_where(record)}: original_final_answer must be a non-empty string, got {gold!r}")
    gold_boxed = maze.extract_boxed(gold)
    gold_norm = normalize_answer(gold_boxed if gold_boxed is not None else gold)
    pred = final_answer_text(output)
    if pred is None:
        return None, False
    return pred, normalize_answer(pred) == gold_norm


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

SCORERS: dict[str, Scorer] = {
    "comt": score_comt,
    "vsp": score_vsp,
    "maze": score_vsp,
    "zebra": score_zebra,
}


def get_scorer(name: str) -> Scorer:
    """The scorer of a data set (the adapter names: ``comt``, ``vsp``, ``maze``, ``zebra``)."""
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"no scorer for data set {name!r}; known: {', '.join(sorted(SCORERS))}") from None


def score(name: str, output: str, record: Mapping[str, Any]) -> Score:
    """``get_scorer(name)(output, record)``."""
    return get_scorer(name)(output, record)


def score_all(name: str, outputs: Iterable[str], records: Iterable[Mapping[str, Any]]) -> tuple[float, list[Score]]:
    """(accuracy, per-record scores) of paired outputs and records of data set ``name``."""
    scorer = get_scorer(name)
    outputs, records = list(outputs), list(records)
    if len(outputs) != len(records):
        raise ValueError(f"{len(outputs)} outputs for {len(records)} records")
    scores = [scorer(out, rec) for out, rec in zip(outputs, records)]
    return (sum(ok for _, ok in scores) / len(scores) if scores else 0.0), scores
