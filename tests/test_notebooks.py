"""The Colab notebooks, executed top to bottom on CPU as CI (``ILVR_NOTEBOOK_CI=1``: the package
is installed already, fewer steps), each from an empty working directory, in a kernel running
this interpreter. Each test checks the files the notebook says it makes."""

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
    monkeypatch.setenv("ILVR_REPO_DIR", REPO)
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
