"""Answer scorers on hand-written model outputs: right, wrong, unparsable and tricky cases."""

from __future__ import annotations

import pytest

from ilvr_jax.evaluate import scorers

PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|>Which one? Answer like \\boxed{A}.<|im_end|>\n"
          "<|im_start|>assistant\n")

COMT = {"id": "comt-1", "original_final_answer": "B"}


# --------------------------------------------------------------------------------------------
# assistant turn
# --------------------------------------------------------------------------------------------


def test_assistant_turn_drops_prompt_end_marker_and_special_tokens():
    out = PROMPT + "Look <|latent_start|><|latent_pad|><|latent_pad|><|latent_end|> so \\boxed{C}<|im_end|>\njunk"
    assert scorers.assistant_turn(out) == "Look  so \\boxed{C}"
    assert scorers.assistant_turn("plain reply") == "plain reply"
    # The last assistant marker counts (a prompt with an earlier assistant turn).
    two = "<|im_start|>assistant\n\\boxed{A}<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\nD."
    assert scorers.assistant_turn(two) == "D."


# --------------------------------------------------------------------------------------------
# CoMT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, letter", [
    ("\\boxed{B}", "B"),
    ("The picture shows a cat.\n\\boxed{\\text{B}}", "B"),
    ("\\boxed{(B) the red one}", "B"),
    ("\\boxed{b}", "B"),
    ("Answer: B", "B"),
    ("So the answer is (B).", "B"),
    ("the final answer is option B because ...", "B"),
    ("Between (A) and (B), I pick (B)", "B"),
    ("B.", "B"),
    ("B", "B"),
    ("Option B fits best", "B"),
    # Several boxes: the last counts.
    ("First guess \\boxed{A}, corrected: \\boxed{B}", "B"),
    # An explicit answer phrase wins over a later mention of another option.
    ("Answer: B. Option A is wrong because (A) has a hole", "B"),
])
def test_comt_right(reply, letter):
    assert scorers.score_comt(PROMPT + reply + "<|im_end|>", COMT) == (letter, True)


@pytest.mark.parametrize("reply, letter", [
    ("\\boxed{C}", "C"),
    ("Answer: D", "D"),
    ("\\boxed{B} was my first thought but \\boxed{A}", "A"),
])
def test_comt_wrong(reply, letter):
    assert scorers.score_comt(PROMPT + reply, COMT) == (letter, False)


@pytest.mark.parametrize("reply", [
    "",
    "I cannot tell.",
    "the answer is a cat",  # lower-case article, not an option letter
    "\\boxed{42}",          # a box that holds no letter decides: unreadable
    "\\boxed{E}",
])
def test_comt_unparsable(reply):
    assert scorers.score_comt(PROMPT + reply, COMT) == (None, False)


def test_comt_box_in_prompt_only_does_not_count():
    # The prompt's \boxed{A} would be wrong anyway; with gold A it must still not score.
    assert scorers.score_comt(PROMPT + "no idea<|im_end|>", {"original_final_answer": "A"}) == (None, False)


@pytest.mark.parametrize("gold", ["B", "(B)", "\\boxed{B}", "B. the second picture", "b"])
def test_comt_reference_forms(gold):
    assert scorers.score_comt("\\boxed{B}", {"original_final_answer": gold})[1]


def test_comt_bad_reference_names_record():
    with pytest.raises(ValueError, match=r"record 'comt-9': original_final_answer 'seven' is not an option letter"):
        scorers.score_comt("\\boxed{B}", {"id": "comt-9", "original_final_answer": "seven"})


# --------------------------------------------------------------------------------------------
# VSP / maze
# --------------------------------------------------------------------------------------------

# S . H
# . . .
# H . G
MAP = [[1, 0, -1], [0, 0, 0], [-1, 0, 2]]
VSP = {"id": "vsp-1", "map_desc": MAP, "original_final_answer": "\\boxed{R,D,D,R}"}


@pytest.mark.parametrize("reply, moves", [
    ("\\boxed{R,D,D,R}", "R,D,D,R"),
    ("Go down first. \\boxed{D,R,R,D}", "D,R,R,D"),
    ("\\boxed{right, down, right, down}", "R,D,R,D"),
    ("\\boxed{\\text{RDDR}}", "R,D,D,R"),
    ("try \\boxed{U} no, \\boxed{D R D R}", "D,R,D,R"),  # the last box counts
    ("\\boxed{D,R,R,D,L}", "D,R,R,D,L"),  # the walk ends on the goal; later moves are not looked at
])
def test_vsp_right(reply, moves):
    assert scorers.score_vsp(PROMPT + reply + "<|im_end|>", VSP) == (moves, True)


@pytest.mark.parametrize("reply, moves", [
    ("\\boxed{R,R}", "R,R"),          # into the hole at (0, 2)
    ("\\boxed{U,D,D,R,R}", "U,D,D,R,R"),  # off the board first
    ("\\boxed{R,D}", "R,D"),          # stops short
    ("\\boxed{R,D,D,R} then \\boxed{D,D}", "D,D"),  # last box: into the hole at (2, 0)
])
def test_vsp_wrong(reply, moves):
    assert scorers.score_vsp(PROMPT + reply, VSP) == (moves, False)


@pytest.mark.parametrize("reply", ["no box R,D,D,R", "\\boxed{go east}", "\\boxed{R,D,D,R"])
def test_vsp_unparsable(reply):
    assert scorers.score_vsp(PROMPT + reply, VSP) == (None, False)


def test_vsp_box_in_prompt_only_does_not_count():
    prompt = PROMPT.replace("\\boxed{A}", "\\boxed{R,D,D,R}")
    assert scorers.score_vsp(prompt + "I do not know.<|im_end|>", VSP) == (None, False)


def test_vsp_bad_record_names_it():
    with pytest.raises(ValueError, match=r"record 'v7': missing key 'map_desc'"):
        scorers.score_vsp("\\boxed{R}", {"id": "v7"})
    with pytest.raises(ValueError, match=r"record 'v8': bad map_desc: .*exactly one start"):
        scorers.score_vsp("\\boxed{R}", {"id": "v8", "map_desc": [[0, 2]]})


def test_maze_uses_the_vsp_rule():
    assert scorers.get_scorer("maze") is scorers.score_vsp


# --------------------------------------------------------------------------------------------
# Zebra-CoT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, gold, pred", [
    ("\\boxed{42}", "42", "42"),
    ("\\boxed{3.0}", "3", "3.0"),
    ("\\boxed{1,000}", "1000", "1,000"),
    ("\\boxed{$12$}", "12", "$12$"),
    ("The pieces fit. Final Answer: 0.50", "0.5", "0.50"),
    ("FINAL ANSWER: The Red House.", "the red house", "The Red House."),
    ("**Final Answer:** 7", "7", "7"),
    ("The final answer is 2,500,000.", "2500000", "2,500,000."),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\text{Paris}}", "paris", "\\text{Paris}"),
    # A box wins over a later "final answer" phrase; several boxes: the last.
    ("\\boxed{1} hmm \\boxed{5}. Final answer: 6", "5", "5"),
    ("Final answer: 3\nthen more thinking\nFinal answer: 4", "4", "4"),
])
def test_zebra_right(reply, gold, pred):
    rec = {"id": "z1", "original_final_answer": gold}
    assert scorers.score_zebra(PROMPT + reply + "<|im_end|>", rec) == (pred, True)


@pytest.mark.parametrize("reply, pred", [
    ("\\boxed{43}", "43"),
    ("\\boxed{4.2}", "4.2"),
    ("Final Answer: forty-two", "forty-two"),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{3}"),
])
def test_zebra_wrong(reply, pred):
    assert scorers.score_zebra(PROMPT + reply, {"original_final_answer": "42"}) == (pred, False)


@pytest.mark.parametrize("reply", ["it is 42", "", "Final answer:", "\\boxed{42"])
def test_zebra_unparsable(reply):
    assert scorers.score_zebra(PROMPT + reply, {"original_final_answer": "42"}) == (None, False)


def test_zebra_box_in_prompt_only_does_not_count():
    prompt = PROMPT.replace("\\boxed{A}", "\\boxed{42}")
    assert scorers.score_zebra(prompt + "I think so.<|im_end|>", {"original_final_answer": "42"}) == (None, False)


def test_zebra_reference_with_box_and_bad_reference():
    assert scorers.score_zebra("\\boxed{12}", {"original_final_answer": "The answer is \\boxed{12.0}"})[1]
    with pytest.raises(ValueError, match=r"record 'z9': original_final_answer must be a non-empty string"):
        scorers.score_zebra("\\boxed{1}", {"id": "z9", "original_final_answer": None})


@pytest.mark.parametrize("raw, norm", [
    ("3.0", "3"), ("1,000", "1000"), (" $5$ ", "5"), ("Yes.", "yes"), ("-0.250", "-0.25"),
    ("1e3", "1000"), ("A  B", "a b"), ("12,34", "12,34"),
])
def test_normalize_answer(raw, norm):
    assert scorers.normalize_answer(raw) == norm


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry():
    assert set(scorers.SCORERS) == {"comt", "vsp", "maze", "zebra"}
    assert scorers.score("comt", "\\boxed{B}", COMT) == ("B", True)
    with pytest.raises(ValueError, match=r"no scorer for data set 'mmlu'; known: comt, maze, vsp, zebra"):
        scorers.get_scorer("mmlu")


def test_score_all():
    outputs = ["\\boxed{B}", "Answer: C", "no idea"]
    records = [COMT, {"original_final_answer": "C"}, COMT]
    acc, scores = scorers.score_all("comt", outputs, records)
    assert scores == [("B", True), ("C", True), (None, False)]
    assert acc == pytest.approx(2 / 3)
    assert scorers.score_all("zebra", [], []) == (0.0, [])
    with pytest.raises(ValueError, match=r"2 outputs for 1 records"):
        scorers.score_all("comt", ["a", "b"], [COMT])
