"""orbax save/restore and the ``python -m ilvr_jax.convert`` CLI, both directions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from ilvr_jax.checkpoint.hf import INDEX_FILE, load_hf_params, select_model_params
from ilvr_jax.checkpoint.orbax_io import restore_config, restore_params, save_params
from ilvr_jax.convert import from_hf, to_hf


def _leaves_with_paths(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def _assert_same(a, b):
    la, lb = _leaves_with_paths(a), _leaves_with_paths(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype, p
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_orbax_round_trip_numpy_and_sharded_like(tiny_dirs, tiny_shape, tmp_path):
    cfg, params = load_hf_params(tiny_dirs(tiny_shape))
    path = save_params(str(tmp_path / "ckpt"), params, cfg)
    assert os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "config"))
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n]  # the temporary directory was renamed
    restored = restore_params(path)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(restored))
    _assert_same(params, restored)
    assert restore_config(path) == cfg

    # Restore straight into a sharded bf16 layout described by ``like``.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=spec), params)
    like["text"]["embed_tokens"]["embedding"] = jax.ShapeDtypeStruct(
        params["text"]["embed_tokens"]["embedding"].shape, jnp.bfloat16, sharding=row)
    got = restore_params(path, like)
    emb = got["text"]["embed_tokens"]["embedding"]
    assert emb.dtype == jnp.bfloat16 and emb.sharding == row
    np.testing.assert_array_equal(
        np.asarray(emb.astype(jnp.float32)),
        params["text"]["embed_tokens"]["embedding"].astype(ml_dtypes.bfloat16).astype(np.float32),
    )


def test_orbax_refuses_to_overwrite_and_bad_paths(tiny_dir, tmp_path):
    cfg, params = load_hf_params(tiny_dir)
    path = save_params(str(tmp_path / "ckpt"), params, cfg)
    with pytest.raises(FileExistsError, match="ckpt: already exists"):
        save_params(path, params, cfg)
    params2 = jax.tree.map(lambda x: x + 1, params)
    save_params(path, params2, cfg, overwrite=True)
    _assert_same(params2, restore_params(path))
    with pytest.raises(FileNotFoundError, match="nothing: not a parameter checkpoint"):
        restore_params(str(tmp_path / "nothing"))
    bare = save_params(str(tmp_path / "bare"), params)
    with pytest.raises(FileNotFoundError, match="bare: checkpoint holds no model config"):
        restore_config(bare)


def test_select_model_params(tiny_dir):
    _, params = load_hf_params(tiny_dir)
    teacher = jax.tree.map(lambda x: x * 2, params)
    state = {"student": params, "teacher": teacher, "step": np.int32(3)}
    assert select_model_params(state) is params
    assert select_model_params(state, "teacher") is teacher
    assert select_model_params({"params": state}, "teacher") is teacher
    assert select_model_params(params) is params
    with pytest.raises(ValueError, match="holds no teacher"):
        select_model_params(params, "teacher")
    with pytest.raises(ValueError, match="no model parameters found.*'opt_state'"):
        select_model_params({"opt_state": {}})


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "ilvr_jax.convert", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_both_ways(tiny_dirs, tmp_path):
    src = tiny_dirs("tied_mqa")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    r = _cli("from-hf", "--hf-dir", src, "--out", ckpt)
    assert r.returncode == 0, r.stderr
    cfg, params = load_hf_params(src)
    _assert_same(params, restore_params(ckpt))
    assert restore_config(ckpt) == cfg

    r = _cli("to-hf", "--checkpoint", ckpt, "--out", out, "--tokenizer-dir", src, "--layout", "legacy")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    original = load_file(os.path.join(src, "model.safetensors"))
    original.pop("lm_head.weight", None)  # tied
    with open(os.path.join(out, INDEX_FILE)) as f:
        shards = set(json.load(f)["weight_map"].values())
    exported = {}
    for s in shards:
        exported.update(load_file(os.path.join(out, s)))
    assert sorted(exported) == sorted(original)
    for k in original:
        assert exported[k].tobytes() == original[k].tobytes(), k

    # An existing export is not overwritten silently.
    r = _cli("to-hf", "--checkpoint", ckpt, "--out", out, "--dtype", "bfloat16")
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr, r.stderr
    kept = {k: v for s in shards for k, v in load_file(os.path.join(out, s)).items()}
    assert all(kept[k].tobytes() == exported[k].tobytes() for k in exported)
    r = _cli("to-hf", "--checkpoint", ckpt, "--out", out, "--dtype", "bfloat16", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "no --tokenizer-dir" in r.stderr
    cfg_bf, p_bf = load_hf_params(out, dtype=ml_dtypes.bfloat16)
    assert cfg_bf == cfg
    _assert_same(jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params), p_bf)



def test_cli_reports_bad_input_in_one_line(tiny_dir, tmp_path, capsys):
    from ilvr_jax.convert import main

    assert main(["from-hf", "--hf-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing: not a directory" in err and "Traceback" not in err
    assert main(["from-hf", "--hf-dir", tiny_dir, "--out", str(tmp_path / "ok")]) == 0
    assert main(["from-hf", "--hf-dir", tiny_dir, "--out", str(tmp_path / "ok")]) == 2
    err = capsys.readouterr().err
    assert "ok: already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert main(["to-hf", "--checkpoint", str(tmp_path / "ok"), "--out", str(tmp_path / "hf"), "--teacher"]) == 2
    assert "holds no teacher" in capsys.readouterr().err


def test_to_hf_picks_student_or_teacher_of_a_training_state(tiny_dir, tmp_path):
    cfg, params = load_hf_params(tiny_dir)
    teacher = jax.tree.map(lambda x: x * 0.5, params)
    ckpt = save_params(str(tmp_path / "state"), {"student": params, "teacher": teacher}, cfg)
    to_hf(ckpt, str(tmp_path / "s"))
    to_hf(ckpt, str(tmp_path / "t"), which="teacher")
    _assert_same(params, load_hf_params(str(tmp_path / "s"))[1])
    _assert_same(teacher, load_hf_params(str(tmp_path / "t"))[1])
    r = _cli("to-hf", "--checkpoint", ckpt, "--out", str(tmp_path / "t2"), "--teacher")
    assert r.returncode == 0, r.stderr
    _assert_same(teacher, load_hf_params(str(tmp_path / "t2"))[1])
    # The Python API of from-hf.
    p = from_hf(tiny_dir, str(tmp_path / "api"), dtype="bfloat16")
    assert restore_params(p)["text"]["norm"]["scale"].dtype == np.dtype(ml_dtypes.bfloat16)
