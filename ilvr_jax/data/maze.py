"""Synthetic FrozenLake mazes in the VSP spatial-planning format, plus the path simulator.

A map (``map_desc``) is a rectangular 2-D list of ints: ``1`` start, ``2`` goal, ``0`` safe ice,
``-1`` hole (the VSP convention). The agent moves one cell per move: ``L`` (column - 1),
``R`` (column + 1), ``U`` (row - 1), ``D`` (row + 1). As in FrozenLake, the goal and the holes
are terminal: a walk ends at the first goal or hole cell it enters, and later moves are not
looked at.

Each generated record is a canonical record (see :mod:`ilvr_jax.data.records`) with
``map_desc`` kept on it so that evaluation can simulate answers:

* ``image_input``: one PNG of the board with the agent on the start cell;
* ``sequence_plan``: for move k, the text ``"Move k: from (r, c) go right to (r, c+1)."`` and
  then a latent step whose helper image is the board with the agent after move k; a closing
  text step says the goal is reached;
* ``original_final_answer``: ``\\boxed{R,D,...}``, the shortest path found by breadth-first
  search with the fixed neighbour order ``L, R, U, D`` (ties go to the lexicographically
  smallest path in that order).

Generation is deterministic: record i draws from its own generator seeded by
``sha256("maze:{seed}:{i}")``, so the same seed gives byte-identical JSONL and PNGs and the
first k records do not depend on ``n``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import random
import re
from typing import Iterable, Sequence

from ilvr_jax.data.records import latent_step, make_record, text_step, write_jsonl

SAFE, START, GOAL, HOLE = 0, 1, 2, -1
CELL_VALUES = (SAFE, START, GOAL, HOLE)

# Moves in breadth-first-search order: this order is the tie-break between shortest paths.
MOVES: dict[str, tuple[int, int]] = {"L": (0, -1), "R": (0, 1), "U": (-1, 0), "D": (1, 0)}
MOVE_WORDS = {"L": "left", "R": "right", "U": "up", "D": "down"}
_WORD_TO_MOVE = {
    "left": "L", "right": "R", "up": "U", "down": "D",
    "l": "L", "r": "R", "u": "U", "d": "D",
    "←": "L", "→": "R", "↑": "U", "↓": "D",
}

# Simulation outcomes.
REACHED_GOAL = "reached_goal"
FELL_IN_HOLE = "fell_in_hole"
LEFT_GRID = "left_grid"
STOPPED_SHORT = "stopped_short"

# Board colours (RGB).
_COLORS = {
    SAFE: (204, 232, 255),  # ice
    START: (255, 236, 179),  # start cell (pale yellow)
    GOAL: (76, 175, 80),  # goal (green)
    HOLE: (33, 33, 66),  # hole (dark navy)
}
_GRID_LINE = (96, 96, 96)
_AGENT = (229, 57, 53)  # red disc
_GOAL_MARK = (255, 215, 0)  # gold star-ish square inside the goal cell

QUESTION_TEMPLATE = (
    "You are given a {rows}x{cols} FrozenLake map. The agent (red disc) starts on the pale "
    "yellow cell and must reach the goal (green cell with a gold square) by moving one cell at a "
    "time: L (left), R (right), U (up) or D (down). Dark cells are holes: stepping into a hole "
    "fails, and so does walking off the map. Plan a path from the start to the goal and give "
    "the move sequence in \\boxed{{}}, for example \\boxed{{R,D,D}}."
)


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """Outcome of walking a move sequence on a map.

    ``outcome`` is one of ``reached_goal``, ``fell_in_hole``, ``left_grid``, ``stopped_short``;
    ``position`` is the last cell on the grid the agent stood on (for ``left_grid``: the cell
    it tried to leave); ``moves_used`` counts the moves applied before the walk ended.
    """

    outcome: str
    position: tuple[int, int]
    moves_used: int

    @property
    def success(self) -> bool:
        return self.outcome == REACHED_GOAL


# --------------------------------------------------------------------------------------------
# Maps, paths, simulation
# --------------------------------------------------------------------------------------------


def check_map(map_desc) -> tuple[int, int]:
    """Raises ValueError unless ``map_desc`` is a rectangular grid of ints in {-1, 0, 1, 2} with
    exactly one start and one goal; returns ``(rows, cols)``."""
    if not isinstance(map_desc, (list, tuple)) or not map_desc:
        raise ValueError(f"map_desc must be a non-empty 2-D list, got {type(map_desc).__name__}")
    rows = len(map_desc)
    if not all(isinstance(row, (list, tuple)) for row in map_desc):
        raise ValueError("map_desc must be a 2-D list (a list of rows)")
    cols = len(map_desc[0])
    if cols == 0 or any(len(row) != cols for row in map_desc):
        raise ValueError(f"map_desc rows must all have the same non-zero length, got "
                         f"{[len(row) for row in map_desc]}")
    flat = [v for row in map_desc for v in row]
    bad = [v for v in flat if isinstance(v, bool) or not isinstance(v, int) or v not in CELL_VALUES]
    if bad:
        raise ValueError(f"map_desc cells must be ints in {{-1, 0, 1, 2}}, got {bad[0]!r}")
    if flat.count(START) != 1 or flat.count(GOAL) != 1:
        raise ValueError(f"map_desc needs exactly one start (1) and one goal (2), got "
                         f"{flat.count(START)} and {flat.count(GOAL)}")
    return rows, cols


def find_cell(map_desc, value: int) -> tuple[int, int]:
    """(row, col) of the first cell holding ``value`` (row-major)."""
    for r, row in enumerate(map_desc):
        for c, v in enumerate(row):
            if v == value:
                return (r, c)
    raise ValueError(f"map has no cell with value {value}")


def simulate(map_desc, moves: Iterable[str]) -> SimulationResult:
    """Walks ``moves`` (letters L/R/U/D) from the start cell.

    The walk ends at the first move that leaves the grid (``left_grid``), enters a hole
    (``fell_in_hole``) or enters the goal (``reached_goal``); if the moves run out first the
    outcome is ``stopped_short``. A move that is not one of L/R/U/D raises ValueError.
    """
    rows, cols = check_map(map_desc)
    r, c = find_cell(map_desc, START)
    used = 0
    for move in moves:
        if move not in MOVES:
            raise ValueError(f"unknown move {move!r}; moves are L, R, U, D")
        dr, dc = MOVES[move]
        used += 1
        nr, nc = r + dr, c + dc
        if not (0 <= nr < rows and 0 <= nc < cols):
            return SimulationResult(LEFT_GRID, (r, c), used)
        r, c = nr, nc
        if map_desc[r][c] == HOLE:
            return SimulationResult(FELL_IN_HOLE, (r, c), used)
        if map_desc[r][c] == GOAL:
            return SimulationResult(REACHED_GOAL, (r, c), used)
    return SimulationResult(STOPPED_SHORT, (r, c), used)


def shortest_path(map_desc) -> list[str] | None:
    """Shortest move sequence from start to goal avoiding holes (breadth-first search).

    Neighbours are expanded in the order L, R, U, D, and each cell keeps the first move that
    reached it; the result is therefore the lexicographically smallest shortest path in the
    order L < R < U < D. Returns None when the goal cannot be reached.
    """
    rows, cols = check_map(map_desc)
    start, goal = find_cell(map_desc, START), find_cell(map_desc, GOAL)
    came_from: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = collections.deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            break
        for move, (dr, dc) in MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            if not (0 <= nxt[0] < rows and 0 <= nxt[1] < cols) or nxt in came_from:
                continue
            if map_desc[nxt[0]][nxt[1]] == HOLE:
                continue
            came_from[nxt] = (cell, move)
            queue.append(nxt)
    if goal not in came_from:
        return None
    path: list[str] = []
    cell = goal
    while came_from[cell] is not None:
        cell, move = came_from[cell]
        path.append(move)
    return path[::-1]


def path_cells(map_desc, moves: Sequence[str]) -> list[tuple[int, int]]:
    """Cells visited: the start cell, then the cell after each move (no bounds checks)."""
    r, c = find_cell(map_desc, START)
    cells = [(r, c)]
    for move in moves:
        dr, dc = MOVES[move]
        r, c = r + dr, c + dc
        cells.append((r, c))
    return cells


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (balanced braces), or None."""
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    begin = starts[-1]
    depth = 1
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None  # unbalanced


def parse_moves(text: str) -> list[str] | None:
    """Move letters from a move-sequence string, or None when it does not read as one.

    Accepted forms (case-insensitive): letters with or without separators (``L,D,R``,
    ``L D R``, ``LDR``, ``L-D-R``), words (``left, down, right``), arrows (``← ↓ →``), wrapped
    in ``\\text{...}`` or ``\\mathrm{...}``. Any other word makes the string unparsable.
    """
    if not isinstance(text, str):
        return None
    body = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\s*", " ", text)
    body = body.replace("{", " ").replace("}", " ").lower()
    tokens = re.findall(r"[a-z]+|[←→↑↓]", body)
    leftover = re.sub(r"[a-z←→↑↓\s,;.\-–>|/\[\]()]+", "", body)
    if leftover or not tokens:
        return None
    moves: list[str] = []
    for token in tokens:
        if token in _WORD_TO_MOVE:
            moves.append(_WORD_TO_MOVE[token])
        elif set(token) <= set("lrud"):
            moves.extend(ch.upper() for ch in token)
        else:
            return None
    return moves


def parse_answer(answer_text: str) -> list[str] | None:
    """Moves inside the last ``\\boxed{}`` of ``answer_text``; None if there is none or it
    does not parse (see :func:`parse_moves`)."""
    boxed = extract_boxed(answer_text)
    return None if boxed is None else parse_moves(boxed)


def format_answer(moves: Sequence[str]) -> str:
    """Canonical answer text: ``\\boxed{R,D,D}``."""
    return "\\boxed{" + ",".join(moves) + "}"


def score_answer(map_desc, answer_text: str) -> bool:
    """True iff the moves in the answer's ``\\boxed{}`` walk from start to goal.

    Unparsable answers (no ``\\boxed{}``, unknown words) score False.
    """
    moves = parse_answer(answer_text)
    if moves is None:
        return False
    return simulate(map_desc, moves).success


def describe_move(move: str, src: tuple[int, int], dst: tuple[int, int], index: int) -> str:
    """Reasoning text for one move, e.g. ``Move 1: from (0, 0) go right to (0, 1).``."""
    return f"Move {index}: from ({src[0]}, {src[1]}) go {MOVE_WORDS[move]} to ({dst[0]}, {dst[1]})."


def plan_texts(map_desc, moves: Sequence[str]) -> list[str]:
    """One reasoning text per move (the text placed before that move's helper image)."""
    cells = path_cells(map_desc, moves)
    return [describe_move(m, cells[k], cells[k + 1], k + 1) for k, m in enumerate(moves)]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def coordinate_shade(index: int) -> tuple[int, int, int]:
    """The grey of row / column ``index`` in a board drawn with ``coordinates`` (8 levels)."""
    v = (index % 8) * 36
    return (v, v, v)


def render_board(map_desc, agent: tuple[int, int] | None = None, cell_px: int = 32, *,
                 coordinates: bool = False):
    """PIL RGB image of the board: one ``cell_px`` square per cell, grid lines, a gold square
    in the goal cell and a red disc on the agent's cell (if given). With ``coordinates`` each
    cell also carries its own position: a strip along its top edge in the grey of its row and
    one along its left edge in the grey of its column (:func:`coordinate_shade`), so a model
    trained from scratch can read where a cell is from the cell alone (a vision tower's patch
    features, and RoPE's relative positions, do not carry absolute coordinates)."""
    from PIL import Image, ImageDraw

    rows, cols = check_map(map_desc)
    img = Image.new("RGB", (cols * cell_px, rows * cell_px), _GRID_LINE)
    draw = ImageDraw.Draw(img)
    for r in range(rows):
        for c in range(cols):
            x0, y0 = c * cell_px, r * cell_px
            draw.rectangle([x0 + 1, y0 + 1, x0 + cell_px - 2, y0 + cell_px - 2],
                           fill=_COLORS[map_desc[r][c]])
            if map_desc[r][c] == GOAL:
                q = cell_px // 3
                draw.rectangle([x0 + q, y0 + q, x0 + cell_px - 1 - q, y0 + cell_px - 1 - q],
                               fill=_GOAL_MARK)
            if coordinates:
                w = max(2, cell_px // 8)
                draw.rectangle([x0 + 1, y0 + 1, x0 + cell_px - 2, y0 + w], fill=coordinate_shade(r))
                draw.rectangle([x0 + 1, y0 + 1, x0 + w, y0 + cell_px - 2], fill=coordinate_shade(c))
    if agent is not None:
        r, c = agent
        m = max(2, cell_px // 5)
        draw.ellipse([c * cell_px + m, r * cell_px + m, (c + 1) * cell_px - 1 - m,
                      (r + 1) * cell_px - 1 - m], fill=_AGENT)
    return img


def _save_png(img, path: str) -> None:
    # No metadata chunks and a fixed compression level: the bytes depend only on the pixels.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="PNG", compress_level=6)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _record_rng(seed: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"maze:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def random_map(rng: random.Random, rows: int, cols: int, hole_prob: float = 0.25,
               max_tries: int = 1000) -> list[list[int]]:
    """A random solvable map: distinct start and goal cells, every other cell a hole with
    probability ``hole_prob``; redrawn until the goal is reachable."""
    if rows * cols < 2:
        raise ValueError(f"a map needs at least 2 cells, got {rows}x{cols}")
    if not 0.0 <= hole_prob < 1.0:
        raise ValueError(f"hole_prob must lie in [0, 1), got {hole_prob}")
    for _ in range(max_tries):
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        start, goal = rng.sample(cells, 2)
        grid = [[SAFE] * cols for _ in range(rows)]
        for r, c in cells:
            if (r, c) not in (start, goal) and rng.random() < hole_prob:
                grid[r][c] = HOLE
        grid[start[0]][start[1]] = START
        grid[goal[0]][goal[1]] = GOAL
        if shortest_path(grid) is not None:
            return grid
    raise RuntimeError(f"no solvable {rows}x{cols} map in {max_tries} draws (hole_prob={hole_prob})")


def make_maze_record(map_desc, record_id: str, image_dir: str, *, cell_px: int = 32) -> dict:
    """Builds one canonical record for ``map_desc`` with image paths ``image_dir/question.png``
    and ``image_dir/step_XX.png`` (``image_dir`` as it should appear in the record)."""
    moves = shortest_path(map_desc)
    if moves is None:
        raise ValueError(f"{record_id}: map has no path from start to goal")
    rows, cols = check_map(map_desc)
    cells = path_cells(map_desc, moves)
    plan: list[dict] = []
    for k, text in enumerate(plan_texts(map_desc, moves)):
        plan.append(text_step(text))
        plan.append(latent_step(f"{image_dir}/step_{k + 1:02d}.png"))
    plan.append(text_step(f"The agent reaches the goal at ({cells[-1][0]}, {cells[-1][1]})."))
    record = make_record(
        QUESTION_TEMPLATE.format(rows=rows, cols=cols),
        [f"{image_dir}/question.png"],
        plan,
        format_answer(moves),
        id=record_id,
        task="maze",
    )
    record["map_desc"] = [list(row) for row in map_desc]
    return record


def write_record_images(record: dict, root: str, *, cell_px: int = 32, coordinates: bool = False) -> None:
    """Renders the question board and one board per move to the record's (root-relative) paths
    (``coordinates``: see :func:`render_board`)."""
    map_desc = record["map_desc"]
    moves = parse_answer(record["original_final_answer"])
    cells = path_cells(map_desc, moves)
    _save_png(render_board(map_desc, cells[0], cell_px, coordinates=coordinates),
              os.path.join(root, record["image_input"][0]))
    helpers = [s["helper_image"] for s in record["sequence_plan"] if s["type"] == "latent"]
    for path, cell in zip(helpers, cells[1:]):
        _save_png(render_board(map_desc, cell, cell_px, coordinates=coordinates), os.path.join(root, path))


def generate_maze_records(n: int, seed: int, sizes: tuple[int, int] = (3, 6), *,
                          hole_prob: float = 0.25, start_index: int = 0):
    """Yields ``n`` records (without writing images); record i has id ``maze-{seed}-{i:06d}``
    and a square map whose side is drawn uniformly from ``sizes[0]..sizes[1]`` (inclusive)."""
    lo, hi = sizes
    if not 2 <= lo <= hi:
        raise ValueError(f"sizes must satisfy 2 <= min <= max, got {sizes}")
    for i in range(start_index, start_index + n):
        rng = _record_rng(seed, i)
        side = rng.randint(lo, hi)
        grid = random_map(rng, side, side, hole_prob)
        record_id = f"maze-{seed}-{i:06d}"
        yield make_maze_record(grid, record_id, f"images/{record_id}")


def generate_maze_dataset(out_dir: str, n: int, seed: int, sizes: tuple[int, int] = (3, 6), *,
                          hole_prob: float = 0.25, cell_px: int = 32,
                          filename: str = "data.jsonl") -> str:
    """Writes ``n`` maze records to ``out_dir/filename`` (JSONL, image paths relative to
    ``out_dir``) and their PNGs under ``out_dir/images/<id>/``; returns the JSONL path.

    Deterministic: the same arguments give byte-identical files.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, filename)
    tmp = path + ".tmp"

    def records_with_images():
        for record in generate_maze_records(n, seed, sizes, hole_prob=hole_prob):
            write_record_images(record, out_dir, cell_px=cell_px)
            yield record

    write_jsonl(tmp, records_with_images())
    os.replace(tmp, path)  # a reader never sees a half-written file
    return path



# --------------------------------------------------------------------------------------------
# Variants of a record for the baselines (text-only SFT, one latent segment as in Mirage)
# --------------------------------------------------------------------------------------------

_TRAIL = (229, 57, 53)  # the path's line, the agent's colour


def render_path_board(map_desc, moves: Sequence[str], cell_px: int = 32, *, coordinates: bool = False):
    """PIL RGB image of the board with the whole walk drawn on it: a line through the centres
    of the visited cells and the agent's disc on the last one (one picture of the solution,
    the single helper image of a Mirage-style record)."""
    from PIL import ImageDraw

    cells = path_cells(map_desc, moves)
    img = render_board(map_desc, cells[-1], cell_px, coordinates=coordinates)
    draw = ImageDraw.Draw(img)
    centres = [(c * cell_px + cell_px // 2, r * cell_px + cell_px // 2) for r, c in cells]
    if len(centres) > 1:
        draw.line(centres, fill=_TRAIL, width=max(2, cell_px // 8))
    return img


def text_only_record(record: dict) -> dict:
    """A copy of a maze record without its latent steps: the same reasoning text and answer,
    no helper images (the text-only fine-tuning baseline)."""
    out = {k: v for k, v in record.items() if k != "helper_images"}
    out["sequence_plan"] = [dict(s) for s in record["sequence_plan"] if s["type"] != "latent"]
    out["map_desc"] = [list(row) for row in record["map_desc"]]
    return out


def single_latent_record(record: dict, helper_image: str) -> dict:
    """A copy of a maze record whose plan starts with one latent step (``helper_image``: the
    whole path drawn on the board, :func:`render_path_board`) followed by the reasoning texts
    without latent steps: Mirage's layout of one imagined picture, then the text."""
    out = text_only_record(record)
    out["sequence_plan"] = [latent_step(helper_image)] + out["sequence_plan"]
    return out


def write_path_image(record: dict, root: str, *, cell_px: int = 32, coordinates: bool = False) -> None:
    """Renders the path board of a :func:`single_latent_record` to its (root-relative) helper
    image path; the moves are read from the record's answer."""
    moves = parse_answer(record["original_final_answer"])
    helpers = [s["helper_image"] for s in record["sequence_plan"] if s["type"] == "latent"]
    if len(helpers) != 1 or moves is None:
        raise ValueError(f"{record.get('id')}: expected one latent step and a \\boxed{{}} move answer")
    _save_png(render_path_board(record["map_desc"], moves, cell_px, coordinates=coordinates),
              os.path.join(root, helpers[0]))
