"""The command line of ``python -m ilvr_jax.main``: config file + preset, ``--config.key=value``
overrides (unknown keys rejected), one clear message for every bad input before any
expensive work, and the demo preset end to end for a few steps."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

_spec = importlib.util.spec_from_file_location("_tr", os.path.join(os.path.dirname(__file__), "train_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)
runs = runs.load()

from ilvr_jax.train import loop  # noqa: E402


def _parse(*args: str):
    """Parses like main.py does (a locked config file flag) into a fresh flag registry."""
    argv = ["prog", *args]
    fv = flags.FlagValues()
    # sys_argv: the overrides to define are read from this argv (main.py reads sys.argv).
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def _config(preset="debug", stage=1, **overrides):
    c = _parse(f"--config={runs.STAGE1 if stage == 1 else runs.STAGE2}:{preset}")
    with c.unlocked():
        for key, value in overrides.items():
            node = c
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return c


# ----------------------------------------------------------------------------- parsing
def test_presets_and_overrides_are_parsed():
    c = _parse(f"--config={runs.STAGE1}:demo", "--config.ilvr.latent_size=6", "--config.mesh.shape=(1,2,1)",
               "--config.train.async_checkpoints=false", "--config.optim.lr=3e-4",
               "--config.train.keep_best_metric=loss", "--config.model.tiny_shape=tied_mqa")
    assert c.ilvr.latent_size == 6 and tuple(c.mesh.shape) == (1, 2, 1)
    assert c.train.async_checkpoints is False and c.optim.lr == pytest.approx(3e-4)
    assert c.train.keep_best_metric == "loss" and c.model.tiny_shape == "tied_mqa"
    assert c.model.init == "tiny" and c.train.num_steps == 60     # demo preset values stay
    paper = _parse(f"--config={runs.STAGE1}")
    assert paper.model.init == "hf" and paper.ilvr.latent_size == 8 and paper.stage == 1
    s2 = _parse(f"--config={runs.STAGE2}:debug")
    assert s2.stage == 2 and s2.model.init == "tiny"


def test_unknown_keys_and_bad_types_are_rejected_in_process():
    with pytest.raises((flags.Error, AttributeError), match='Did you mean "latent_size"'):
        _parse(f"--config={runs.STAGE1}:debug", "--config.ilvr.latnet_size=3")
    with pytest.raises(flags.Error):
        _parse(f"--config={runs.STAGE1}:debug", "--config.ilvr.latent_size=abc")
    with pytest.raises(Exception, match="unknown preset"):
        _parse(f"--config={runs.STAGE1}:nosuchpreset")


def test_every_config_key_is_read_by_the_program():
    """Keys must mean something: each leaf key of every preset is read by the training loop."""
    from ilvr_jax.train import distributed, evaluation, run_model

    src = "".join(open(m.__file__).read() for m in (loop, run_model, evaluation, distributed))

    def leaves(d, prefix=""):
        for k, v in d.items():
            if hasattr(v, "items"):
                yield from leaves(v, prefix + k + ".")
            else:
                yield prefix + k

    for preset in ("paper", "demo", "debug", "v5p_8", "v5p_8_32k", "v5e_16", "v5e_32", "gpu_8"):
        for key in leaves(_config(preset)):
            assert f"c.{key}" in src, f"config key {key} is never read"


def test_unknown_override_key_fails_before_any_work(tmp_path):
    wd = str(tmp_path / "run")
    t0 = time.time()
    p = subprocess.run(runs.main_cmd(wd, "--config.ilvr.latnet_size=3"), cwd=runs.REPO, env=runs.env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "latnet_size" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(wd)
    assert time.time() - t0 < 120


@pytest.mark.parametrize("args, message", [
    (("--config.ilvr.latnet_size=3",), "error: unknown config key 'ilvr.latnet_size'; did you mean 'ilvr.latent_size'?"),
    # A name from another code base: the key whose documentation says what it is.
    (("--config.optim.learning_rate=1e-4",), "error: unknown config key 'optim.learning_rate'; did you mean 'optim.lr'?"),
    (("--config", "configs/stage1.py:debug", "--config.optimm.lr=1e-4"), "did you mean 'optim.lr'?"),
    (("--config.train.nosuch=1",), "the keys under 'train' are async_checkpoints, checkpoint_every,"),
    # Presets for other hardware on this CPU host.
    (("--config=configs/stage1.py:v5p_8", "--config.model.init=tiny", "--config.data.adapter=maze"),
     "error: mesh.distributed=True, but jax.distributed.initialize() found no multi-host cluster here"),
    (("--config=configs/stage1.py:gpu_8", "--config.model.init=tiny", "--config.data.adapter=maze"),
     "error: model.attn_impl='cudnn' needs NVIDIA GPUs, this host runs on cpu"),
    (("--config.ilvr.latent_size=abc",), "error: flag --config.ilvr.latent_size=abc"),
    (("--config=configs/stage1.py:nosuchpreset",), "unknown preset 'nosuchpreset'"),
    (("--config=configs/nosuchfile.py",), "error: --config: [Errno 2] No such file or directory"),
])
def test_bad_flags_give_one_error_line(tmp_path, args, message):
    wd = str(tmp_path / "run")
    own_config = any(a == "--config" or a.startswith("--config=") for a in args)
    cmd = [sys.executable, "-m", "ilvr_jax.main", *args, f"--workdir={wd}"] if own_config else runs.main_cmd(wd, *args)
    p = subprocess.run(cmd, cwd=runs.REPO, env=runs.env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and message in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(wd)


def test_describe_prints_every_key_with_its_value_and_meaning():
    p = subprocess.run([sys.executable, "-m", "ilvr_jax.main", f"--config={runs.STAGE2}:demo", "--describe"],
                       cwd=runs.REPO, env=runs.env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = {line.split(" = ", 1)[0]: line for line in p.stdout.splitlines()}

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, prefix + k + ".") if hasattr(v, "items") else [prefix + k]

    config = _config("demo", stage=2)
    assert sorted(lines) == sorted(leaves(config))
    assert "stage = 2 " in lines["stage"] and "# " in lines["stage"]
    assert "optim.lr = 0.001 " in lines["optim.lr"] and "learning rate" in lines["optim.lr"]
    assert all("(undocumented)" not in line and len(line.split("# ", 1)[1]) > 10 for line in lines.values())


def test_bad_value_fails_with_one_message_before_any_work(tmp_path):
    wd = str(tmp_path / "run")
    p = subprocess.run(runs.main_cmd(wd, "--config.ilvr.latent_size=0", "--config.ilvr.top_p=1.5"), cwd=runs.REPO,
                       env=runs.env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.startswith("error: invalid config"), p.stderr[-2000:]
    assert "ilvr.latent_size (K) must be >= 1" in p.stderr and "ilvr.top_p must be in (0, 1]" in p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.exists(wd)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("overrides, message", [
    ({"ilvr.latent_size": 0}, "ilvr.latent_size (K) must be >= 1"),
    ({"ilvr.top_p": 0.0}, "ilvr.top_p must be in (0, 1]"),
    ({"ilvr.top_p": 1.01}, "ilvr.top_p must be in (0, 1]"),
    ({"ilvr.num_candidates": 0}, "ilvr.num_candidates (L) must be >= 1"),
    ({"train.nan_policy": "ignore"}, "train.nan_policy"),
    ({"train.keep_best_metric": "accuracy"}, "train.keep_best_metric"),
    ({"train.max_steps_ahead": 0}, "train.max_steps_ahead must be >= 1, got 0"),
    ({"data.batch_size": 3, "optim.grad_accum_steps": 2}, "must be divisible by optim.grad_accum_steps"),
    ({"mesh.shape": (1, 1)}, "mesh.shape must be (data, fsdp, tensor)"),
    ({"train.stage2_chunk_len": "0,-1"}, "train.stage2_chunk_len must be 'auto' or 'FIRST,REST'"),
    ({"data.adapter": "canonical", "data.train_path": "/no/such/file.jsonl"}, "data.train_path: /no/such/file.jsonl does not exist"),
    ({"data.adapter": "canonical", "data.train_path": ""}, "data.train_path is required"),
    ({"data.image_root": "/no/such/dir"}, "data.image_root: /no/such/dir is not a directory"),
    ({"model.vocab_resize": "shrink"}, "model.vocab_resize must be one of"),
])
def test_bad_values_give_one_clear_message(overrides, message):
    c = _config(**overrides)
    with pytest.raises(loop.ConfigError) as e:
        loop.validate_config(c)
    assert message in str(e.value)


def test_bad_paths_give_one_clear_message(tmp_path):
    with pytest.raises(loop.ConfigError, match="model.hf_dir is required"):
        loop.validate_config(_config("paper", **{"data.train_path": str(tmp_path)}))
    with pytest.raises(loop.ConfigError, match="has no config.json"):
        loop.validate_config(_config("paper", **{"model.hf_dir": str(tmp_path), "data.train_path": str(tmp_path)}))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(loop.ConfigError, match="is not a directory"):
        loop.validate_config(_config(), str(not_a_dir))


def test_bucket_paths_are_checked_through_storage(monkeypatch):
    from ilvr_jax import storage

    paths = {"model.hf_dir": "gs://b/model", "data.adapter": "canonical", "data.train_path": "gs://b/train.jsonl",
             "data.image_root": "gs://b/images"}
    # Without gcsfs or tensorflow: one line per path, naming the key, the path and the package.
    monkeypatch.setattr(storage, "_installed", lambda package: False)
    with pytest.raises(loop.ConfigError) as e:
        loop.validate_config(_config("paper", **paths), "gs://b/run")
    lines = str(e.value).splitlines()[1:]
    for key, path in [("--workdir", "gs://b/run"), ("model.hf_dir", "gs://b/model"),
                      ("data.train_path", "gs://b/train.jsonl"), ("data.image_root", "gs://b/images")]:
        assert f"  - {key}: {path}: gs:// paths need gcsfs or tensorflow, and neither is installed " \
               "(pip install gcsfs)" in lines, lines
    monkeypatch.undo()
    # With the bucket reachable (in memory, through etils.epath) the files are looked up there.
    spec = importlib.util.spec_from_file_location("_fb", os.path.join(os.path.dirname(__file__), "..",
                                                                      "fake_bucket.py"))
    fake_bucket = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_bucket)
    with fake_bucket.load().install():
        with pytest.raises(loop.ConfigError) as e:
            loop.validate_config(_config("paper", **paths), "gs://b/run")
        assert str(e.value).splitlines()[1:] == ["  - model.hf_dir: gs://b/model has no config.json",
                                                 "  - data.train_path: gs://b/train.jsonl does not exist",
                                                 "  - data.image_root: gs://b/images is not a directory"]
        storage.write_text("gs://b/model/config.json", "{}")
        storage.write_text("gs://b/train.jsonl", "")
        storage.write_text("gs://b/images/x.png", "")
        loop.validate_config(_config("paper", **paths), "gs://b/run")


def test_generated_mazes_go_into_a_bucket_workdir(tmp_path):
    """The maze adapter without a source generates its records into the workdir: in a gs://
    workdir (in memory, through etils.epath) the files are the ones a local workdir gets."""
    from ilvr_jax import storage
    from ilvr_jax.data import records

    c = _config(**{"data.generate_records": 3})
    local, _ = loop.prepare_data(c, str(tmp_path / "run"))
    spec = importlib.util.spec_from_file_location("_fb", os.path.join(os.path.dirname(__file__), "..",
                                                                      "fake_bucket.py"))
    fake_bucket = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_bucket)
    with fake_bucket.load().install():
        remote, root = loop.prepare_data(c, "gs://b/run")
        assert remote == "gs://b/run/data/train.jsonl" and root is None
        assert storage.read_text(remote) == open(local).read()
        assert not storage.exists("gs://b/run/data/train.jsonl.tmp")
        for loc in records.read_jsonl(remote):   # every image is in the bucket, beside the JSONL
            rec = records.validate_located(loc, verify_images=True)
            for path in rec["image_input"] + records.helper_images(rec):
                full = records.resolve_image_path(path, loc.root)
                assert full.startswith("gs://b/run/data/")
                assert storage.read_bytes(full) == open(records.resolve_image_path(path, str(tmp_path / "run" / "data")),
                                                        "rb").read()
        assert loop.prepare_data(c, "gs://b/run") == (remote, None)   # a second start reuses them


def test_stage2_without_a_stage1_checkpoint_is_rejected(tmp_path):
    with pytest.raises(loop.ConfigError, match="stage 2 needs train.init_from"):
        loop.validate_config(_config(stage=2))
    with pytest.raises(loop.ConfigError, match="does not exist"):
        loop.validate_config(_config(stage=2, **{"train.init_from": str(tmp_path / "missing")}))
    with pytest.raises(loop.ConfigError, match="no training checkpoints found"):
        loop.validate_config(_config(stage=2, **{"train.init_from": str(tmp_path)}))
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir(parents=True)   # an unfinished save only
    with pytest.raises(loop.ConfigError, match="holds no finished checkpoint"):
        loop.validate_config(_config(stage=2, **{"train.init_from": str(tmp_path)}))


def test_mesh_not_matching_the_devices_is_rejected_before_work(tmp_path):
    import jax

    n = jax.device_count()          # 8 fake CPU devices in the tests
    with pytest.raises(loop.ConfigError, match=f"needs {n + 1} devices, but {n} are available"):
        loop.check_mesh(_config(**{"mesh.shape": (1, n + 1, 1)}))
    with pytest.raises(loop.ConfigError, match="must be divisible by data x fsdp"):
        loop.check_mesh(_config(**{"mesh.shape": (1, n, 1), "data.batch_size": 2}))
    assert dict(loop.check_mesh(_config(**{"mesh.shape": (1, -1, 1), "data.batch_size": n})).shape) == \
        {"data": 1, "fsdp": n, "tensor": 1}
    wd = tmp_path / "run"
    t0 = time.time()
    with pytest.raises(loop.ConfigError):
        loop.train_and_evaluate(_config(**{"mesh.shape": (1, 3, 1)}), str(wd))
    assert time.time() - t0 < 10 and not wd.exists()


# ----------------------------------------------------------------------------- end to end
def test_demo_preset_end_to_end(tmp_path):
    wd = str(tmp_path / "demo")
    p = runs.run_main(wd, "--config.train.num_steps=3", "--config.train.log_every=1",
                      "--config.train.checkpoint_every=2", "--config.train.keep_best_metric=loss",
                      config=runs.STAGE1 + ":demo", cache_dir=str(tmp_path / "cache"))
    out = p.stdout + p.stderr
    # The resolved config is printed and saved, overrides applied.
    assert "resolved config:" in p.stdout
    with open(os.path.join(wd, "config.json")) as f:
        saved = json.load(f)
    assert saved["train"]["num_steps"] == 3 and saved["model"]["init"] == "tiny" and saved["stage"] == 1
    # Console: our metric lines and the progress bar, not orbax's INFO chatter.
    assert not re.search(r"^I\d{4} ", out, re.M), "absl/orbax INFO lines reached the console"
    for step in (1, 2, 3):
        line = next(l for l in p.stdout.splitlines() if f"ilvr_jax: step {step}:" in l)
        for key in ("loss=", "ce=", "sim=", "kstar=", "grad_norm=", "lr="):
            assert key in line, (key, line)
        # Throughput from the second step on (the first one includes compilation).
        assert ("tokens_per_s=" in line) == (step > 1), line
        assert "mfu=" not in line                 # unknown peak FLOP/s on CPU
    assert "3/3" in p.stdout                      # the progress bar
    logged = runs.metrics(wd)
    assert [r["step"] for r in logged] == [1, 2, 3]
    for r in logged:
        assert r["loss"] == pytest.approx(r["ce"] + r["sim"], rel=1e-5)   # ce_weight = sim_weight = 1
        assert (r["step"] == 1 or r["tokens_per_s"] > 0) and "mfu" not in r
        assert 1 <= r["kstar"] <= 4
    from ilvr_jax.train.metrics import read_tensorboard_scalars

    tb = read_tensorboard_scalars(os.path.join(wd, "tensorboard"))
    for key in ("loss", "ce", "sim", "kstar", "grad_norm", "lr"):
        assert sorted(tb[f"train/{key}"]) == [1, 2, 3]
    assert sorted(tb["train/tokens_per_s"]) == [2, 3]
    assert tb["train/loss"][3] == pytest.approx(logged[2]["loss"], rel=1e-6)
    assert runs.finished_steps(wd)[-1] == 3
    # keep_best_metric: each checkpoint carries the mean loss since the previous checkpoint.
    with open(os.path.join(wd, "checkpoints", "3", "metrics", "metrics")) as f:
        assert json.load(f) == {"loss": pytest.approx(logged[2]["loss"], rel=1e-6)}
    assert os.path.isfile(os.path.join(wd, "export_hf", "config.json"))
    # A second start with the same workdir resumes (nothing left to do) without any flag.
    p2 = runs.run_main(wd, "--config.train.num_steps=3", "--config.train.log_every=1",
                       "--config.train.checkpoint_every=2", config=runs.STAGE1 + ":demo",
                       cache_dir=str(tmp_path / "cache"))
    assert "at step 3" in p2.stdout and [r["step"] for r in runs.metrics(wd)] == [1, 2, 3]
