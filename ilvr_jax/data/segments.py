"""A canonical record -> one training sample: token ids, labels, latent segments, image patches.

The sequence (Qwen2.5-VL chat template, default system prompt)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n  [<|vision_start|> n_i x <|image_pad|> <|vision_end|>] for each question image
                       question text<|im_end|>\\n
    <|im_start|>assistant\\n  plan step_1 step_2 ... [answer]<|im_end|>\\n

* User turn: the HF content list ``[image, ..., image, text]``: all question images (in
  ``image_input`` order) before the question text, as Qwen2.5-VL's examples and the template
  place them; image i has ``t*h*w/4`` pads. If ``text_input`` holds literal ``<image>``
  placeholders (one per question image, else ``RecordError`` "image_placeholders"), image i
  replaces the i-th placeholder instead and the text around it stays verbatim (the
  reference's ``place_input_image``; see ``processor.user_messages``).
* Assistant turn: the plan steps concatenated in order with nothing inserted between them:
  a text step is its ``content`` verbatim, a latent step is
  ``<|latent_start|>`` + K x ``<|latent_pad|>`` + ``<|latent_end|>`` (the helper image is not
  tokenised; its patches go to the teacher separately). By default (``answer_format=None``,
  as in the ILVR reference) the assistant turn is the plan alone: ``original_final_answer``
  is not appended, the plan is expected to end with the answer. ``answer_format`` (e.g.
  ``"\\n{answer}"``) appends ``answer_format.format(answer=original_final_answer)`` after the
  plan, for plans that do not state the answer. Then ``<|im_end|>\\n`` as the template closes
  every turn.
* The whole string is tokenised in one call (special tokens split the text, so this equals
  tokenising the HF chat template output), then each ``<|image_pad|>`` is expanded.

Labels (ILVR reference, method section 9): -100 at every position up to and including the
role token(s) ``assistant`` of ``<|im_start|>assistant``; from the following ``\\n`` on every
token is its own label (``<|latent_start|>``, ``<|latent_end|>``, text, ``<|im_end|>``, the
trailing ``\\n``) except latent pads (-100). Labels are unshifted (HF convention: the loss
compares logits[t] with labels[t+1]); padding gets -100 when batched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ilvr_jax.data import processor as proc
from ilvr_jax.data.records import IMAGE_PLACEHOLDERS, UNREADABLE_IMAGE, RecordError, resolve_image_path

LATENT_PAD = "<|latent_pad|>"
LATENT_START = "<|latent_start|>"
LATENT_END = "<|latent_end|>"
IGNORE = -100

SPECIAL_IN_TEXT = "special_token_in_text"
BAD_TOKENS = "bad_tokens"
BAD_ASPECT = "bad_aspect"  # an image side more than 200 times the other (smart_resize refuses it)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the data side needs, read from the tokenizer (plain ints)."""

    im_start: int
    im_end: int
    pad: int  # <|endoftext|>, the padding id
    vision_start: int
    vision_end: int
    image_pad: int
    latent_pad: int
    latent_start: int
    latent_end: int
    assistant_role: tuple[int, ...]  # the ids of "<|im_start|>assistant"

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        """Raises ``ValueError`` naming the token if the tokenizer lacks one."""
        get = lambda t: proc.special_token_id(tokenizer, t)  # noqa: E731
        return cls(
            im_start=get("<|im_start|>"), im_end=get("<|im_end|>"), pad=get("<|endoftext|>"),
            vision_start=get(proc.VISION_START), vision_end=get(proc.VISION_END), image_pad=get(proc.IMAGE_PAD),
            latent_pad=get(LATENT_PAD), latent_start=get(LATENT_START), latent_end=get(LATENT_END),
            assistant_role=tuple(tokenizer("<|im_start|>assistant", add_special_tokens=False)["input_ids"]),
        )


@dataclasses.dataclass(frozen=True)
class SequenceFormat:
    """How a record becomes a token sequence.

    latent_size: K, latent pads per segment (ILVR default 8).
    answer_format: appended after the plan, ``{answer}`` = ``original_final_answer``; None (the
      reference's behaviour) appends nothing.
    merge_size: vision merge size (image pads per image = t*h*w / merge_size**2).
    """

    latent_size: int = 8
    answer_format: str | None = None
    merge_size: int = 2

    def __post_init__(self) -> None:
        if self.latent_size < 1:
            raise ValueError(f"latent_size must be >= 1, got {self.latent_size}")


def latent_segment_text(latent_size: int) -> str:
    return LATENT_START + LATENT_PAD * latent_size + LATENT_END


def assistant_text(rec: Mapping[str, Any], fmt: SequenceFormat) -> str:
    """The assistant turn's content: plan steps in order (latent steps as segments), then the answer."""
    parts = []
    for step in rec["sequence_plan"]:
        parts.append(step["content"] if step["type"] == "text" else latent_segment_text(fmt.latent_size))
    if fmt.answer_format is not None:
        parts.append(fmt.answer_format.format(answer=rec["original_final_answer"]))
    return "".join(parts)


def _forbidden_strings(tokenizer) -> tuple[str, ...]:
    fixed = {"<|im_start|>", "<|im_end|>", "<|endoftext|>", proc.VISION_START, proc.VISION_END, proc.IMAGE_PAD,
             "<|vision_pad|>", "<|video_pad|>", LATENT_PAD, LATENT_START, LATENT_END}
    return tuple(sorted(fixed | set(getattr(tokenizer, "all_special_tokens", ()) or ())))


def check_no_control_tokens(name: str, text: str, tokenizer, where: str) -> None:
    """``text`` (the record field ``name``) must not contain a control token (it would be
    tokenised as one): the chat, vision and latent tokens, and the tokenizer's special
    tokens (``tokenizer`` may be None)."""
    for tok in _forbidden_strings(tokenizer):
        if tok in text:
            raise RecordError(where, SPECIAL_IN_TEXT, f"{name} contains the control token {tok!r}")


def check_text(rec: Mapping[str, Any], tokenizer, where: str) -> None:
    """Every text of a record passes :func:`check_no_control_tokens`."""
    texts = [("text_input", rec["text_input"]), ("original_final_answer", rec["original_final_answer"])]
    texts += [(f"sequence_plan[{i}]", s["content"]) for i, s in enumerate(rec["sequence_plan"]) if s["type"] == "text"]
    for name, text in texts:
        check_no_control_tokens(name, text, tokenizer, where)


@dataclasses.dataclass
class TokenizedSample:
    """Token-level view of one sample (no pixels)."""

    input_ids: np.ndarray  # [L] int32
    labels: np.ndarray  # [L] int32
    latent_starts: np.ndarray  # [M] int32, positions of <|latent_start|>
    assistant_start: int  # position of the assistant turn's <|im_start|>


def build_labels(input_ids: np.ndarray, label_start: int, latent_pad_id: int) -> np.ndarray:
    """labels[t] = input_ids[t] for t >= label_start, except latent pads; -100 elsewhere."""
    labels = np.where(np.arange(len(input_ids)) >= label_start, input_ids, IGNORE).astype(np.int32)
    labels[input_ids == latent_pad_id] = IGNORE
    return labels


def tokenize_record(
    rec: Mapping[str, Any],
    tokenizer,
    question_grids: Sequence[Sequence[int]],
    fmt: SequenceFormat,
    *,
    ids: SpecialIds | None = None,
    where: str = "<record>",
) -> TokenizedSample:
    """Token ids, labels, latent segment starts and the assistant start of a record.

    ``question_grids`` are the (t, h, w) grids of the record's question images, in order.
    """
    ids = ids if ids is not None else SpecialIds.from_tokenizer(tokenizer)
    if len(question_grids) != len(rec["image_input"]):
        raise ValueError(f"{where}: {len(question_grids)} grids for {len(rec['image_input'])} question images")
    check_text(rec, tokenizer, where)
    try:
        prompt = proc.build_prompt_text(tokenizer, rec["text_input"], len(question_grids), add_generation_prompt=True)
    except ValueError as e:  # placeholder count differs from the image count
        raise RecordError(where, IMAGE_PLACEHOLDERS, str(e)) from None
    full = prompt + assistant_text(rec, fmt) + "<|im_end|>\n"
    raw = tokenizer(full, add_special_tokens=False)["input_ids"]
    counts = [proc.num_image_tokens(g, fmt.merge_size) for g in question_grids]
    input_ids = np.asarray(proc.expand_image_pads(raw, ids.image_pad, counts), dtype=np.int32)

    # The assistant turn opens with the last <|im_start|> (record text holds no control tokens).
    starts = np.flatnonzero(input_ids == ids.im_start)
    if len(starts) < 2:
        raise RecordError(where, BAD_TOKENS, "no assistant turn found in the token sequence")
    assistant_start = int(starts[-1])
    role = ids.assistant_role
    if input_ids[assistant_start:assistant_start + len(role)].tolist() != list(role):
        raise RecordError(where, BAD_TOKENS, "assistant turn does not start with '<|im_start|>assistant'")
    labels = build_labels(input_ids, assistant_start + len(role), ids.latent_pad)

    latent_starts = np.flatnonzero(input_ids == ids.latent_start).astype(np.int32)
    k = fmt.latent_size
    n_latent = sum(1 for s in rec["sequence_plan"] if s["type"] == "latent")
    ok = len(latent_starts) == n_latent and all(
        p > assistant_start
        and p + k + 1 < len(input_ids)
        and (input_ids[p + 1:p + 1 + k] == ids.latent_pad).all()
        and input_ids[p + k + 1] == ids.latent_end
        for p in latent_starts
    )
    if not ok or (input_ids == ids.latent_pad).sum() != n_latent * k:
        raise RecordError(where, BAD_TOKENS, "latent segments are not tokenised as start + K pads + end")
    return TokenizedSample(input_ids, labels, latent_starts, assistant_start)


@dataclasses.dataclass
class Sample:
    """One training sample, unpadded (the per-sample rows of the batch layout)."""

    input_ids: np.ndarray  # [L] int32
    labels: np.ndarray  # [L] int32
    attention_mask: np.ndarray  # [L] int32 (all ones)
    pixel_values: np.ndarray  # [Pq, patch_dim] float32, question images concatenated
    image_grid_thw: np.ndarray  # [Iq, 3] int32
    helper_pixel_values: np.ndarray  # [Ph, patch_dim] float32, helper images concatenated in segment order
    helper_grid_thw: np.ndarray  # [M, 3] int32, row m = segment m's helper image
    latent_starts: np.ndarray  # [M] int32
    segment_mask: np.ndarray  # [M] bool (all True)
    assistant_start: int
    where: str = ""


@dataclasses.dataclass(frozen=True)
class SampleSize:
    """What a record needs of the fixed batch shapes (computed without decoding pixels).
    ``seq_len`` is the full length: prompt, image pads, plan with latent segments, closing tokens."""

    seq_len: int | None
    num_question_images: int
    question_patches: int
    num_segments: int
    helper_patches: int
    # Stage 2 runs the text between latent segments as chunks (``ilvr.recurrence``): the
    # longest chunk after the first (0 without segments; None without a tokenizer).
    later_chunk_len: int | None = None
    # ... and the first chunk: up to and including the first <|latent_start|> (the whole
    # sequence without segments; None without a tokenizer).
    first_chunk_len: int | None = None


def later_chunk_length(latent_starts: np.ndarray, latent_size: int, seq_len: int) -> int:
    """The longest text chunk after the first: from a segment's ``<|latent_end|>`` up to
    and including the next ``<|latent_start|>`` (or to the end of the sequence after the
    last segment); 0 without segments. The chunks of ``ilvr.recurrence.chunk_bounds``."""
    starts = [int(p) + latent_size + 1 for p in latent_starts]
    ends = [int(p) + 1 for p in latent_starts[1:]] + [int(seq_len)]
    return max((e - s for s, e in zip(starts, ends)), default=0)


def first_chunk_length(latent_starts: np.ndarray, seq_len: int) -> int:
    """The first text chunk's length: up to and including the first ``<|latent_start|>``,
    the whole sequence without segments (chunk 0 of ``ilvr.recurrence.chunk_bounds``)."""
    return int(latent_starts[0]) + 1 if len(latent_starts) else int(seq_len)


def question_paths(rec: Mapping[str, Any], root) -> list[str]:
    return [resolve_image_path(p, root) for p in rec["image_input"]]


def helper_paths(rec: Mapping[str, Any], root) -> list[str]:
    return [resolve_image_path(s["helper_image"], root) for s in rec["sequence_plan"] if s["type"] == "latent"]


def measure_record(
    rec: Mapping[str, Any],
    root,
    tokenizer,
    image_cfg: proc.ImageProcessorConfig,
    fmt: SequenceFormat,
    *,
    ids: SpecialIds | None = None,
    where: str = "<record>",
) -> SampleSize:
    """Sequence length and patch counts of a record from image headers and the tokenizer
    (``tokenizer`` None: patch counts only, ``seq_len`` None)."""
    q_grids = [proc.image_grid_thw(*_size(p, where), image_cfg) for p in question_paths(rec, root)]
    h_grids = [proc.image_grid_thw(*_size(p, where), image_cfg) for p in helper_paths(rec, root)]
    seq_len = later = first = None
    if tokenizer is not None:
        tok = tokenize_record(rec, tokenizer, q_grids, fmt, ids=ids, where=where)
        seq_len = len(tok.input_ids)
        later = later_chunk_length(tok.latent_starts, fmt.latent_size, seq_len)
        first = first_chunk_length(tok.latent_starts, seq_len)
    return SampleSize(
        seq_len=seq_len,
        num_question_images=len(q_grids),
        question_patches=sum(proc.num_patches(g) for g in q_grids),
        num_segments=len(h_grids),
        helper_patches=sum(proc.num_patches(g) for g in h_grids),
        later_chunk_len=later,
        first_chunk_len=first,
    )


def _size(path: str, where: str) -> tuple[int, int]:
    try:
        h, w = proc.image_size(path)
    except (OSError, ValueError) as e:
        raise RecordError(where, UNREADABLE_IMAGE, f"cannot read image {path!r}: {e}") from None
    if max(h, w) / min(h, w) > 200:
        raise RecordError(where, BAD_ASPECT, f"image {path!r} is {w}x{h}: aspect ratio above 200")
    return h, w


def build_sample(
    rec: Mapping[str, Any],
    root,
    tokenizer,
    image_cfg: proc.ImageProcessorConfig,
    fmt: SequenceFormat,
    *,
    ids: SpecialIds | None = None,
    where: str = "<record>",
    image_loader: Callable[[str], Any] = proc.load_image,
) -> Sample:
    """Decodes and preprocesses the record's images and tokenises it."""

    def load_all(paths):
        images = []
        for p in paths:
            try:
                images.append(image_loader(p))
            except (OSError, ValueError, SyntaxError) as e:  # PIL reports some broken files as SyntaxError
                raise RecordError(where, UNREADABLE_IMAGE, f"cannot read image {p!r}: {e}") from None
        return proc.preprocess_images(images, image_cfg)

    q_pv, q_grid = load_all(question_paths(rec, root))
    h_pv, h_grid = load_all(helper_paths(rec, root))
    tok = tokenize_record(rec, tokenizer, [tuple(g) for g in q_grid], fmt, ids=ids, where=where)
    m = len(h_grid)
    return Sample(
        input_ids=tok.input_ids,
        labels=tok.labels,
        attention_mask=np.ones_like(tok.input_ids),
        pixel_values=q_pv,
        image_grid_thw=q_grid.astype(np.int32),
        helper_pixel_values=h_pv,
        helper_grid_thw=h_grid.astype(np.int32),
        latent_starts=tok.latent_starts,
        segment_mask=np.ones((m,), bool),
        assistant_start=tok.assistant_start,
        where=where,
    )
