"""The Colab notebooks, executed top to bottom on CPU as CI (``ILVR_NOTEBOOK_CI=1``: the package
is installed already, fewer steps), each from an empty working directory, in a kernel running
this interpreter. Each test checks the files the notebook says it makes. The install cell
(where the package comes from, set in the cell before it) is checked alone with the commands
it would run recorded instead of run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELL_TIMEOUT_S = 900
KERNEL = "ilvr-notebook-ci"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernelspec for this interpreter (found through JUPYTER_PATH) and the CI environment."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ilvr_jax CI", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("ILVR_NOTEBOOK_CI", "1")
    monkeypatch.setenv("ILVR_SOURCE", REPO)   # the notebooks run from an empty directory, outside the checkout
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # The suite's 8 fake host devices would not fit the notebooks' single-device presets.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    return work


def _execute(name: str, cwd) -> dict:
    import nbclient
    import nbformat

    nb = nbformat.read(os.path.join(REPO, "colab", name), as_version=4)
    nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _cli(*args, cwd):
    p = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.slow
def test_quickstart_runs_the_demo_curves_evaluation_and_selection(kernel_env):
    nb = _execute("quickstart.ipynb", kernel_env)
    demo = kernel_env / "runs" / "demo"
    for stage in ("stage1", "stage2"):
        assert (demo / stage / "export_hf" / "config.json").is_file()
        assert (demo / stage / "metrics.jsonl").is_file()
    summary = json.loads((demo / "eval" / "summary.json").read_text())
    assert summary["modes"]["normal"]["count"] == 2
    assert list((demo / "selection").rglob("*.png"))
    text = _text(nb)
    assert "ILVR demo finished" in text and "normal: " in text
    # The selection overlays are shown in the notebook, not only written.
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_finetune_trains_both_stages_evaluates_exports_and_reloads_in_transformers(kernel_env, monkeypatch):
    inputs = kernel_env.parent / "inputs"
    _cli("ilvr_jax.tiny", "--out", str(inputs / "model"), cwd=kernel_env)
    _cli("ilvr_jax.data", "maze", "--out", str(inputs / "train"), "--n", "16", "--seed", "0", cwd=kernel_env)
    _cli("ilvr_jax.data", "maze", "--out", str(inputs / "test"), "--n", "4", "--seed", "1", cwd=kernel_env)
    for key, value in {"ILVR_MODEL_DIR": inputs / "model", "ILVR_DATA": inputs / "train" / "data.jsonl",
                       "ILVR_EVAL_DATA": inputs / "test" / "data.jsonl", "ILVR_ADAPTER": "canonical",
                       "ILVR_SCORER": "maze",
                       # The analytic GPU estimate: the TPU compile needs libtpu (tests/test_aot.py).
                       "ILVR_AOT_TOPOLOGY": "h100-8"}.items():
        monkeypatch.setenv(key, str(value))
    nb = _execute("finetune.ipynb", kernel_env)
    run = kernel_env / "runs" / "finetune"
    for stage in ("stage1", "stage2"):
        assert [json.loads(line)["step"] for line in (run / stage / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (run / "eval" / "summary.json").is_file()
    config = json.loads((run / "export_hf" / "config.json").read_text())
    assert {"latent_pad_token_id", "latent_start_token_id", "latent_end_token_id"} <= set(config)
    text = _text(nb)
    assert "verdict: FITS" in text and "logits shape: (1, " in text


# ----------------------------------------------------------------------------- install cell
NOTEBOOKS = ("quickstart.ipynb", "finetune.ipynb")


def _tagged(name: str, tag: str) -> str:
    with open(os.path.join(REPO, "colab", name), encoding="utf-8") as f:
        cells = [c for c in json.load(f)["cells"] if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged {tag!r}"
    return "".join(cells[0]["source"])


def _install(name: str, source: str | None = None, *, ci: bool = False) -> tuple[dict, list[tuple[str, ...]]]:
    """Runs the notebook's setting cell (``ILVR_SOURCE`` replaced by ``source`` unless None)
    and install cell with ``sh`` recording the commands; returns (namespace, commands)."""
    commands: list[tuple[str, ...]] = []
    ns = {"os": os, "sys": sys, "subprocess": subprocess, "CI": ci, "sh": lambda *cmd: commands.append(cmd)}
    exec(_tagged(name, "setting"), ns)
    assert ns["ILVR_SOURCE"] == "", f"{name}: the setting cell must ship empty"
    if source is not None:
        ns["ILVR_SOURCE"] = source
    exec(_tagged(name, "install").split("\nprint(\"ilvr_jax checkout:\"")[0], ns)   # up to REPO_DIR
    return ns, commands


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_takes_the_checkout_around_the_notebook_a_path_or_a_git_url(name, tmp_path, monkeypatch):
    monkeypatch.delenv("ILVR_SOURCE", raising=False)
    pip = (sys.executable, "-m", "pip", "install", "-q", "-e")
    # Opened from colab/ of a checkout: that checkout, editable with the tpu extra.
    monkeypatch.chdir(os.path.join(REPO, "colab"))
    ns, cmds = _install(name)
    assert ns["REPO_DIR"] == REPO and cmds[0] == pip + (f"{REPO}[tpu]",)
    # A checkout's path, from anywhere.
    monkeypatch.chdir(tmp_path)
    ns, cmds = _install(name, REPO)
    assert ns["REPO_DIR"] == REPO and cmds[0] == pip + (f"{REPO}[tpu]",)
    # A git URL (pip's git+ form too): cloned into ./ilvr_jax, which is installed.
    for url in ("https://example.org/team/ilvr_jax.git", "git+https://example.org/team/ilvr_jax.git"):
        ns, cmds = _install(name, url)
        clone = str(tmp_path / "ilvr_jax")
        assert ns["REPO_DIR"] == clone
        assert cmds[:2] == [("git", "clone", "https://example.org/team/ilvr_jax.git", clone), pip + (f"{clone}[tpu]",)]
    # CI: the package is installed already; the checkout is found, nothing runs.
    ns, cmds = _install(name, REPO, ci=True)
    assert ns["REPO_DIR"] == REPO and cmds == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_without_a_source_outside_a_checkout_says_what_to_set(name, tmp_path, monkeypatch):
    monkeypatch.delenv("ILVR_SOURCE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception) as e:
        _install(name)
    assert type(e.value).__name__ == "SetupError"
    msg = str(e.value)
    assert "\n" not in msg and "ILVR_SOURCE is empty" in msg and str(tmp_path) in msg and "git URL" in msg
    with pytest.raises(Exception, match=r"ILVR_SOURCE = .*: not an ilvr_jax checkout"):
        _install(name, str(tmp_path))
    # $ILVR_SOURCE fills an empty setting.
    monkeypatch.setenv("ILVR_SOURCE", REPO)
    ns, _ = _install(name)
    assert ns["REPO_DIR"] == REPO
