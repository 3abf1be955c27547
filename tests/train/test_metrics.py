"""Run metrics: analytic FLOPs against the real parameter shapes, throughput/MFU, the
metrics log and TensorBoard files (including the rewrite on resume), batch fingerprints."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from ilvr_jax.train import metrics as M


@pytest.fixture(scope="module")
def model_cfg():
    from ilvr_jax import tiny
    from ilvr_jax.model.config import ModelConfig

    return ModelConfig.from_hf(tiny.hf_config(tiny.build_tokenizer(), "untied_gqa2"))


def _param_shapes(cfg):
    from ilvr_jax.model import qwen25vl

    return jax.eval_shape(lambda: qwen25vl.init_params(cfg, jax.random.PRNGKey(0)))


def test_lm_matmul_params_match_the_parameter_tree(model_cfg):
    """Multiply-adds per token = sizes of the decoder's matmul kernels + the LM head."""
    shapes = _param_shapes(model_cfg)
    layers = shapes["text"]["layers"]
    kernels = [layers["self_attn"][k]["kernel"] for k in ("q_proj", "k_proj", "v_proj", "o_proj")]
    kernels += [layers["mlp"][k]["kernel"] for k in ("gate_proj", "up_proj", "down_proj")]
    head = shapes["lm_head"]["kernel"] if "lm_head" in shapes else shapes["text"]["embed_tokens"]["embedding"]
    expected = sum(int(np.prod(k.shape)) for k in kernels) + int(np.prod(head.shape))
    assert M.lm_matmul_params(model_cfg) == expected


def test_vision_matmul_params_match_the_parameter_tree(model_cfg):
    shapes = _param_shapes(model_cfg)["visual"]
    v = model_cfg.vision
    blocks = shapes["blocks"]
    per_patch = int(np.prod(shapes["patch_embed"]["kernel"].shape))
    per_patch += sum(int(np.prod(blocks[a][b]["kernel"].shape)) for a, b in
                     [("attn", "qkv"), ("attn", "proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
                      ("mlp", "down_proj")])
    # The merger runs once per merge_unit patches.
    per_patch += (int(np.prod(shapes["merger"]["fc1"]["kernel"].shape))
                  + int(np.prod(shapes["merger"]["fc2"]["kernel"].shape))) // v.merge_unit
    assert M.vision_matmul_params(model_cfg) == per_patch


def test_step_flops_terms(model_cfg):
    kw = dict(batch=2, seq_len=64, question_patches=16, helper_patches=32)
    s1 = M.step_flops(model_cfg, stage=1, **kw)
    s2 = M.step_flops(model_cfg, stage=2, **kw)
    t = model_cfg.text
    n = M.lm_matmul_params(model_cfg)
    tokens = 2 * 64
    attn = 2 * 2 * (64 * 64 / 2) * t.num_attention_heads * t.head_dim * t.num_hidden_layers * 2
    v = model_cfg.vision
    vis = lambda p: 2 * M.vision_matmul_params(model_cfg) * p * 2 + 2 * 2 * p * p * v.hidden_size * v.depth * 2
    assert s2 == pytest.approx(6 * n * tokens + 3 * attn + vis(16))
    assert s1 - s2 == pytest.approx(2 * n * tokens + attn + vis(32))   # the teacher's forward
    assert M.step_flops(model_cfg, stage=2, vision_trainable=True, **kw) - s2 == pytest.approx(2 * vis(16))


def test_throughput_and_mfu(monkeypatch):
    clock = iter([0.0, 2.0, 3.0, 4.0, 10.0, 11.0])
    monkeypatch.setattr(M.time, "perf_counter", lambda: next(clock))
    thr = M.Throughput(flops_per_step=1e12, num_devices=4, peak=1e12)
    thr.update(100.0)
    thr.update(300.0)
    out = thr.read()                     # 2 steps, 400 tokens in 2 s
    assert out["tokens_per_s"] == pytest.approx(200.0)
    assert out["step_time_s"] == pytest.approx(1.0)
    assert out["mfu"] == pytest.approx(2e12 / 2.0 / 4 / 1e12)
    thr.update(50.0)
    assert thr.read()["tokens_per_s"] == pytest.approx(50.0)   # counters reset at each read
    assert thr.read() == {"tokens_per_s": None, "step_time_s": None, "tflops_per_device": None, "mfu": None}
    cpu = M.Throughput(1e9, 1, M.peak_flops_per_device())
    cpu.update(10.0)
    assert M.peak_flops_per_device() is None and cpu.read()["mfu"] is None   # CPU: unknown peak


def test_kept_step_metrics_are_read_together_in_step_order(monkeypatch):
    import jax.numpy as jnp

    kept = M.KeptStepMetrics()
    calls = []
    real_get = jax.device_get
    monkeypatch.setattr(M.jax, "device_get", lambda x: calls.append(len(x)) or real_get(x))
    for step in (1, 2, 3):
        kept.add(step, {"loss": jnp.float32(step / 4), "finite": jnp.asarray(step != 2)}, extra=10 * step)
    assert len(kept) == 3 and calls == []          # nothing read while steps are kept
    got = kept.read()
    assert calls == [3]                            # one transfer for the three steps
    assert got == [(1, {"loss": 0.25, "finite": True}, 10), (2, {"loss": 0.5, "finite": False}, 20),
                   (3, {"loss": 0.75, "finite": True}, 30)]
    assert all(type(m["loss"]) is float and type(m["finite"]) is bool for _, m, _ in got)
    assert len(kept) == 0 and kept.read() == [] and calls == [3]


def test_kept_step_metrics_bound_how_far_the_host_runs_ahead():
    """With ``wait_for_lag(2)`` after each dispatched step, every kept step but the newest two
    has finished; without it the host is several steps ahead of a slow device."""
    import jax.numpy as jnp

    @jax.jit
    def slow_step(x):   # ~0.1 s on one CPU core
        return jax.lax.fori_loop(0, 40, lambda i, a: jnp.tanh(a @ a.T / 512.0), x)

    x = jnp.ones((512, 512)) * 0.01
    slow_step(x).block_until_ready()    # compiled

    def run(bound: int | None) -> list[int]:
        """Per dispatched step: how many kept steps are unfinished after the (optional) wait."""
        kept, a, behind = M.KeptStepMetrics(), x, []
        for step in range(1, 7):
            a = slow_step(a)
            kept.add(step, {"loss": a[0, 0]})
            if bound is not None:
                kept.wait_for_lag(bound)
            behind.append(sum(not m["loss"].is_ready() for _, m, _ in kept._kept))
        kept.read()
        return behind

    assert max(run(None)) >= 4        # the measurement can see a host that runs ahead
    assert max(run(2)) <= 2


def test_peak_flops_by_device_kind():
    class Dev:
        device_kind = "NVIDIA H100 80GB HBM3"

    assert M.peak_flops_per_device(Dev()) == 989e12
    Dev.device_kind = "TPU v5 lite"
    assert M.peak_flops_per_device(Dev()) == 197e12


@pytest.fixture(params=["local", "bucket"])
def workdir(request, tmp_path):
    """A local workdir and one in a gs:// bucket (in memory, through etils.epath)."""
    if request.param == "local":
        yield str(tmp_path)
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fb", os.path.join(os.path.dirname(__file__), "..",
                                                                      "fake_bucket.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.load().install():
        yield "gs://test-bucket/run"


def test_writer_jsonl_and_tensorboard_with_resume(workdir):
    from ilvr_jax import storage

    wd = workdir
    w = M.MetricWriter(wd)
    for step in range(1, 6):
        w.write(step, {"loss": float(step), "mfu": None}, extra={"batch_fingerprint": f"{step:08x}"})
    w.close()
    jsonl = storage.join(wd, "metrics.jsonl")
    storage.write_text(jsonl, storage.read_text(jsonl) + '{"step": 6, "loss"')   # torn line of a killed run
    # Resume from step 3: later lines go, and TensorBoard purges steps > 3.
    w = M.MetricWriter(wd, resume_step=3)
    for step in (4, 5):
        w.write(step, {"loss": 10.0 * step})
    w.close()
    lines = M.read_jsonl(jsonl)
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert "mfu" not in lines[0] and lines[0]["batch_fingerprint"] == "00000001"
    tb = M.read_tensorboard_scalars(storage.join(wd, "tensorboard"))
    assert tb == {"train/loss": {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0}}
    assert len([f for f in storage.listdir(storage.join(wd, "tensorboard")) if "tfevents" in f]) == 2
    json.dumps(lines)


def test_tensorboard_records_are_framed_as_tensorboardx_frames_them(tmp_path):
    """The event file's bytes equal tensorboardX's ``RecordWriter`` output for the same events."""
    from tensorboardX.record_writer import RecordWriter

    w = M.TensorBoardWriter(str(tmp_path / "ours"), purge_step=4)
    w.write(5, {"train/loss": 1.5})
    w.close()
    ours = open(w.path, "rb").read()
    # The same serialized events (the payloads of our file) written by tensorboardX.
    payloads, pos = [], 0
    while pos < len(ours):
        n = int.from_bytes(ours[pos:pos + 8], "little")
        payloads.append(ours[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
    assert len(payloads) == 3   # file version, purge marker, one summary
    ref = RecordWriter(str(tmp_path / "ref.tfevents"))
    for p in payloads:
        ref.write(p)
    ref.close()
    assert ours == open(tmp_path / "ref.tfevents", "rb").read()


def test_batch_fingerprint_sees_tokens_and_order():
    r = np.random.default_rng(0)
    batch = {"input_ids": r.integers(0, 100, (2, 8), dtype=np.int32),
             "attention_mask": np.ones((2, 8), np.int32), "pixel_values": np.zeros((2, 4, 3), np.float32)}
    fp = M.batch_fingerprint(batch)
    assert fp == M.batch_fingerprint({k: v.copy() for k, v in batch.items()})
    swapped = {k: v[::-1].copy() for k, v in batch.items()}
    assert M.batch_fingerprint(swapped) != fp or np.array_equal(batch["input_ids"][0], batch["input_ids"][1])
    changed = dict(batch, input_ids=batch["input_ids"].copy())
    changed["input_ids"][1, 3] += 1
    assert M.batch_fingerprint(changed) != fp


def test_console_line_puts_the_headline_metrics_first_and_omits_unknown_mfu():
    line = M.format_scalars({"param_norm": 2.0, "tokens_per_s": 10.0, "mfu": None, "loss": 1.5, "kstar": 3.0,
                             "ce": 1.0, "sim": 0.5, "lr": 1e-4, "grad_norm": 0.25})
    assert line == "loss=1.5 ce=1 sim=0.5 kstar=3 grad_norm=0.25 lr=0.0001 tokens_per_s=10 param_norm=2"
    assert "mfu=0.42" in M.format_scalars({"loss": 1.0, "mfu": 0.42})
