"""Synthetic mazes: simulator, shortest paths (against brute force), answers, determinism, images."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image

from ilvr_jax.data import maze
from ilvr_jax.data.records import helper_images, validate_record

# S . .
# . H .
# . . G
MAP = [[1, 0, 0], [0, -1, 0], [0, 0, 2]]


@pytest.mark.parametrize(
    "moves, outcome, position, used",
    [
        ("RRDD", maze.REACHED_GOAL, (2, 2), 4),
        ("DDRR", maze.REACHED_GOAL, (2, 2), 4),
        ("RRDDL", maze.REACHED_GOAL, (2, 2), 4),  # the goal is terminal: later moves are not walked
        ("RD", maze.FELL_IN_HOLE, (1, 1), 2),
        ("U", maze.LEFT_GRID, (0, 0), 1),
        ("RRR", maze.LEFT_GRID, (0, 2), 3),
        ("R", maze.STOPPED_SHORT, (0, 1), 1),
        ("", maze.STOPPED_SHORT, (0, 0), 0),
        ("RLRL", maze.STOPPED_SHORT, (0, 0), 4),
    ],
)
def test_simulate_cases(moves, outcome, position, used):
    result = maze.simulate(MAP, list(moves))
    assert (result.outcome, result.position, result.moves_used) == (outcome, position, used)
    assert result.success == (outcome == maze.REACHED_GOAL)


def test_simulate_rejects_unknown_moves_and_bad_maps():
    with pytest.raises(ValueError, match="unknown move"):
        maze.simulate(MAP, ["X"])
    for bad, msg in [
        ([[1, 0], [0]], "same non-zero length"),
        ([[1, 0], [0, 0]], "exactly one start"),
        ([[1, 2], [2, 0]], "exactly one start"),
        ([[1, 3], [0, 2]], "ints in"),
        ([], "non-empty"),
    ]:
        with pytest.raises(ValueError, match=msg):
            maze.simulate(bad, [])


@pytest.mark.parametrize(
    "text, moves",
    [
        ("\\boxed{R,R,D,D}", "RRDD"),
        ("\\boxed{RRDD}", "RRDD"),
        ("\\boxed{r, r, d, d}", "RRDD"),
        ("\\boxed{ R R D D }", "RRDD"),
        ("\\boxed{right, right, down, down}", "RRDD"),
        ("\\boxed{Right Right Down Down}", "RRDD"),
        ("\\boxed{\\text{R-R-D-D}}", "RRDD"),
        ("\\boxed{→ → ↓ ↓}", "RRDD"),
        ("The path is \\boxed{L} no wait \\boxed{R,R,D,D}", "RRDD"),  # the last box counts
    ],
)
def test_parse_answer_accepted_forms(text, moves):
    assert maze.parse_answer(text) == list(moves)
    assert maze.score_answer(MAP, text)


@pytest.mark.parametrize(
    "text",
    ["RRDD", "\\boxed{}", "\\boxed{go right}", "\\boxed{R,R,D,D", "\\boxed{1. R 2. D}", "", None],
)
def test_unparsable_answers_score_false(text):
    assert maze.parse_answer(text) is None
    assert not maze.score_answer(MAP, text)


def test_score_answer_wrong_paths():
    assert not maze.score_answer(MAP, "\\boxed{R,D}")  # hole
    assert not maze.score_answer(MAP, "\\boxed{U}")  # off the grid
    assert not maze.score_answer(MAP, "\\boxed{R,R,D}")  # short


def _brute_force_shortest(map_desc, max_len):
    """First sequence in L < R < U < D lexicographic order among the shortest that reach the
    goal exactly on their last move (an independent reference for the BFS)."""
    for length in range(1, max_len + 1):
        for moves in itertools.product("LRUD", repeat=length):
            result = maze.simulate(map_desc, moves)
            if result.success and result.moves_used == length:
                return list(moves)
    return None


def test_shortest_path_matches_brute_force():
    records = list(maze.generate_maze_records(40, seed=5, sizes=(3, 4)))
    checked = 0
    for rec in records:
        path = maze.shortest_path(rec["map_desc"])
        if len(path) > 6:
            continue  # keep the brute force small
        assert path == _brute_force_shortest(rec["map_desc"], 6), rec["id"]
        checked += 1
    assert checked >= 20
    assert maze.shortest_path([[1, -1], [-1, 2]]) is None


def test_generated_records_are_valid_solvable_and_scored(tmp_path):
    path = maze.generate_maze_dataset(str(tmp_path), 30, seed=11, sizes=(3, 6))
    with open(path) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 30
    sides = {len(r["map_desc"]) for r in records}
    assert sides <= {3, 4, 5, 6} and len(sides) >= 3
    assert any(-1 in row for r in records for row in r["map_desc"])  # holes do occur
    for rec in records:
        validate_record(rec, str(tmp_path), where=rec["id"])  # images exist and open
        grid = rec["map_desc"]
        assert all(len(row) == len(grid) for row in grid)
        moves = maze.parse_answer(rec["original_final_answer"])
        assert rec["original_final_answer"] == "\\boxed{" + ",".join(moves) + "}"
        assert maze.score_answer(grid, rec["original_final_answer"])
        assert len(moves) == len(maze.shortest_path(grid))
        assert len(helper_images(rec)) == len(moves)
        # Text before each latent step, the move it describes matches the answer.
        plan = rec["sequence_plan"]
        for k, move in enumerate(moves):
            assert plan[2 * k]["type"] == "text" and plan[2 * k + 1]["type"] == "latent"
            assert f"go {maze.MOVE_WORDS[move]} to" in plan[2 * k]["content"]
            assert plan[2 * k]["content"].startswith(f"Move {k + 1}: ")
        # Wrong answers fail: one move short, or the first move left out.
        assert not maze.score_answer(grid, maze.format_answer(moves[:-1]))
        if len(moves) > 1:
            assert not maze.score_answer(grid, maze.format_answer(moves[1:]))


def test_helper_images_show_agent_after_each_move(tmp_path):
    path = maze.generate_maze_dataset(str(tmp_path), 5, seed=2, sizes=(4, 4), cell_px=20)
    with open(path) as f:
        rec = json.loads(f.readline())
    grid = rec["map_desc"]
    cells = maze.path_cells(grid, maze.parse_answer(rec["original_final_answer"]))
    images = [rec["image_input"][0]] + helper_images(rec)
    assert len(images) == len(cells)
    red = np.array(maze._AGENT)
    for image_path, (r, c) in zip(images, cells):
        arr = np.asarray(Image.open(os.path.join(tmp_path, image_path)).convert("RGB")).astype(int)
        assert arr.shape == (4 * 20, 4 * 20, 3)
        centres = {(rr, cc): arr[rr * 20 + 10, cc * 20 + 10] for rr in range(4) for cc in range(4)}
        red_cells = [cell for cell, px in centres.items() if np.abs(px - red).sum() < 10]
        assert red_cells == [(r, c)]
        # Holes are dark everywhere the agent is not.
        for (rr, cc), px in centres.items():
            if grid[rr][cc] == maze.HOLE:
                assert px.sum() < 200


def _tree_bytes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


def test_generation_is_deterministic(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    maze.generate_maze_dataset(a, 8, seed=7)
    maze.generate_maze_dataset(b, 8, seed=7)
    maze.generate_maze_dataset(c, 8, seed=8)
    files_a, files_b, files_c = _tree_bytes(a), _tree_bytes(b), _tree_bytes(c)
    assert files_a == files_b
    assert len(files_a) > 8 and all(k.endswith(".png") or k == "data.jsonl" for k in files_a)
    assert files_a["data.jsonl"] != files_c["data.jsonl"]
    maps_a = [json.loads(x)["map_desc"] for x in files_a["data.jsonl"].decode().splitlines()]
    maps_c = [json.loads(x)["map_desc"] for x in files_c["data.jsonl"].decode().splitlines()]
    assert maps_a != maps_c
    # Record i does not depend on n.
    first3 = list(maze.generate_maze_records(3, seed=7))
    assert [r["map_desc"] for r in first3] == maps_a[:3]


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="sizes"):
        list(maze.generate_maze_records(1, 0, sizes=(5, 3)))
    with pytest.raises(ValueError, match="hole_prob"):
        list(maze.generate_maze_records(1, 0, hole_prob=1.0))


def test_text_only_record_keeps_the_text_and_drops_the_latents(tmp_path):
    rec = next(maze.generate_maze_records(1, seed=3, sizes=(4, 4)))
    text = maze.text_only_record(rec)
    moves = maze.parse_answer(rec["original_final_answer"])
    assert [s["type"] for s in text["sequence_plan"]] == ["text"] * (len(moves) + 1)
    assert [s["content"] for s in text["sequence_plan"]] == \
        [s["content"] for s in rec["sequence_plan"] if s["type"] == "text"]
    assert helper_images(text) == []
    for key in ("text_input", "image_input", "original_final_answer", "map_desc", "id"):
        assert text[key] == rec[key]
    assert len(helper_images(rec)) == len(moves)   # the source record is left as it was
    validate_record(text, str(tmp_path), where=text["id"], check_images=False)


def test_single_latent_record_and_its_path_image(tmp_path):
    rec = next(r for r in maze.generate_maze_records(20, seed=4, sizes=(4, 4))
               if len(maze.parse_answer(r["original_final_answer"])) >= 3)
    single = maze.single_latent_record(rec, f"images/{rec['id']}/path.png")
    plan = single["sequence_plan"]
    assert plan[0] == {"type": "latent", "helper_image": f"images/{rec['id']}/path.png"}
    assert [s["type"] for s in plan[1:]] == ["text"] * (len(plan) - 1)
    maze.write_record_images(rec, str(tmp_path), cell_px=20)
    maze.write_path_image(single, str(tmp_path), cell_px=20)
    validate_record(single, str(tmp_path), where=single["id"])
    arr = np.asarray(Image.open(os.path.join(tmp_path, plan[0]["helper_image"])).convert("RGB")).astype(int)
    cells = maze.path_cells(rec["map_desc"], maze.parse_answer(rec["original_final_answer"]))
    red = np.array(maze._AGENT)

    def reddish(px):
        return np.abs(px - red).sum() < 10

    # The trail passes through the centre of every visited cell and of no cell off the path
    # (cell centres are where the line's segments meet).
    for rr in range(4):
        for cc in range(4):
            assert reddish(arr[rr * 20 + 10, cc * 20 + 10]) == ((rr, cc) in cells), (rr, cc)
    with pytest.raises(ValueError, match="one latent step"):
        maze.write_path_image(rec, str(tmp_path))


def test_boards_with_coordinates_carry_each_cells_row_and_column_and_keep_the_rest(tmp_path):
    """``coordinates=True``: each cell's top strip has the grey of its row and its left strip
    the grey of its column; the cell's centre (its type and the agent) is as on the plain board."""
    map_desc = [[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, -1], [0, 0, 0, 2]]
    px = 28
    plain = np.asarray(maze.render_board(map_desc, (1, 2), px))
    coded = np.asarray(maze.render_board(map_desc, (1, 2), px, coordinates=True))
    assert plain.shape == coded.shape == (4 * px, 4 * px, 3)
    w = px // 8
    for r in range(4):
        for c in range(4):
            y0, x0 = r * px, c * px
            top = coded[y0 + 1:y0 + w + 1, x0 + w + 2:x0 + px - 2]
            left = coded[y0 + w + 2:y0 + px - 2, x0 + 1:x0 + w + 1]
            assert (top == maze.coordinate_shade(r)).all(), (r, c)
            assert (left == maze.coordinate_shade(c)).all(), (r, c)
            centre = (slice(y0 + w + 2, y0 + px - 2), slice(x0 + w + 2, x0 + px - 2))
            np.testing.assert_array_equal(coded[centre], plain[centre])
    assert len({maze.coordinate_shade(i) for i in range(8)}) == 8
    # The records' images and the path image take the option too.
    rec = maze.make_maze_record(map_desc, "m0", "images/m0")
    maze.write_record_images(rec, str(tmp_path), cell_px=px, coordinates=True)
    q = np.asarray(Image.open(tmp_path / "images/m0/question.png").convert("RGB"))
    np.testing.assert_array_equal(q, np.asarray(maze.render_board(map_desc, (0, 0), px, coordinates=True)))
    single = maze.single_latent_record(rec, "images/m0/path.png")
    maze.write_path_image(single, str(tmp_path), cell_px=px, coordinates=True)
    path = np.asarray(Image.open(tmp_path / "images/m0/path.png").convert("RGB"))
    assert (path[1:w + 1, px + w + 2:2 * px - 2] == maze.coordinate_shade(0)).all()
