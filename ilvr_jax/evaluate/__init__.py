"""Evaluation: answer extraction and scoring per data set (``scorers``)."""

from ilvr_jax.evaluate.scorers import (  # noqa: F401
    SCORERS,
    assistant_turn,
    final_answer_text,
    get_scorer,
    normalize_answer,
    option_letter,
    score,
    score_all,
    score_comt,
    score_vsp,
    score_zebra,
)
