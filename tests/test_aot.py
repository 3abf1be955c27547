"""``python -m ilvr_jax.aot``: the fit check compiles the real train step for TPU topologies
with libtpu on this CPU host (installed by the ``libtpu`` fixture when missing), and
estimates GPUs analytically."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1 = os.path.join(REPO, "configs", "stage1.py")
STAGE2 = os.path.join(REPO, "configs", "stage2.py")
# The debug preset's tiny model on 4 v5e chips, the state sharded over all of them.
TINY_V5E = ("--topology=v5e:2x2", "--config.mesh.shape=(1,4,1)", "--config.data.batch_size=4")


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)   # the tests' 8 fake CPU devices are not what the command sees
    e.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return e


def run_aot(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ilvr_jax.aot", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def libtpu():
    """libtpu in the running environment: ``jax[tpu]`` of the installed jax's version is
    pip-installed when missing (it must not change jax or jaxlib)."""
    if importlib.util.find_spec("libtpu") is None:
        versions = {p: importlib.metadata.version(p) for p in ("jax", "jaxlib")}
        p = subprocess.run([sys.executable, "-m", "pip", "install", f"jax[tpu]=={versions['jax']}"],
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"installing jax[tpu]=={versions['jax']} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
        importlib.invalidate_caches()
        after = {pkg: importlib.metadata.version(pkg) for pkg in versions}
        assert after == versions, f"installing libtpu changed {versions} to {after}"
    assert importlib.util.find_spec("libtpu") is not None


def _report(p: subprocess.CompletedProcess) -> dict:
    assert p.stdout.strip(), p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- no compiler
def test_topology_names_map_to_libtpu_names():
    from ilvr_jax import aot

    assert aot.resolve_target("v5p-8") == ("tpu", "v5p:2x2x1", 0)
    assert aot.resolve_target("v5p-16") == ("tpu", "v5p:2x2x2", 0)
    assert aot.resolve_target("v5e-16") == aot.resolve_target("v5litepod-16") == ("tpu", "v5e:4x4", 0)
    assert aot.resolve_target("v5e-8") == ("tpu", "v5e:2x4", 0)
    assert aot.resolve_target("v6e-4") == ("tpu", "v6e:2x2", 0)
    assert aot.resolve_target("v5p:2x2x1") == ("tpu", "v5p:2x2x1", 0)
    assert aot.resolve_target("h100-8") == ("gpu", "h100", 8)
    assert aot.preset_target(f"{STAGE1}:v5p_8") == "v5p-8"
    assert aot.preset_target(f"{STAGE1}:v5e_16") == "v5e-16"
    assert aot.preset_target(f"{STAGE1}:v5e_32") == "v5e-32"
    assert aot.preset_target(f"{STAGE1}:v5p_8_32k") == "v5p-8"
    assert aot.preset_target(f"{STAGE1}:gpu_8") == "h100-8"
    assert aot.preset_target(f"{STAGE1}:debug") is None and aot.preset_target(STAGE1) is None
    with pytest.raises(aot.ConfigError, match="no v5p slice of 7 TensorCores"):
        aot.resolve_target("v5p-7")


def test_replicated_large_leaves_are_counted():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from ilvr_jax import aot

    mesh = Mesh(np.asarray(jax.devices()[:4]), ("fsdp",))
    rep, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("fsdp"))
    big = (1024, 512)                     # 2 MiB in fp32
    tree = {"a": jax.ShapeDtypeStruct(big, jnp.float32, sharding=rep),
            "b": jax.ShapeDtypeStruct(big, jnp.float32, sharding=split),
            "c": {"d": jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=rep)}}   # 256 KiB
    assert aot.replicated_large_leaves(tree) == [("a", 2**21)]
    info = aot.state_summary(tree, {}, (1, 4, 1))
    assert info["state_bytes"] == 2 * 2**21 + 2**18
    assert info["state_bytes_per_device"] == 2**21 + 2**21 // 4 + 2**18
    assert info["replicated_large_leaves"] == 1 and info["replicated_examples"] == ["a"]


def _hf_7b_parameter_counts(vocab: int) -> tuple[int, int]:
    """(all parameters, vision tower parameters) of HF's Qwen2.5-VL-7B with ``vocab`` rows,
    counted by transformers on the meta device (nothing allocated)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ilvr_jax.model.config import ModelConfig

    hf = Qwen2_5_VLConfig.from_dict(ModelConfig().to_hf_dict())
    hf.text_config.vocab_size = vocab
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(hf)
    total = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.model.visual.parameters())
    return total, visual


@pytest.mark.parametrize("stage", [1, 2])
def test_gpu_preset_reports_the_7b_state_transformers_counts(stage):
    p = run_aot(f"--config={STAGE1 if stage == 1 else STAGE2}:gpu_8", "--json", timeout=300)
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr[-3000:]
    r = _report(p)
    total, visual = _hf_7b_parameter_counts(151668)
    trainable = total - visual
    # fp32 student + AdamW mu, nu of the LLM (+ the fp32 teacher of the LLM in stage 1) + counters.
    want = 4 * (total + (3 if stage == 1 else 2) * trainable)
    assert want <= r["state_bytes"] <= want + 1024, (r["state_bytes"], want)
    assert r["source"] == "analytic" and r["devices"] == 8 and r["mesh"] == [1, 8, 1]
    assert r["state_bytes_ideal_per_device"] <= r["state_bytes_per_device"] <= 1.05 * r["state_bytes_ideal_per_device"]
    assert r["replicated_large_leaves"] == 0
    assert r["peak_bytes"] > r["state_bytes_per_device"] + r["batch_bytes_per_device"]
    assert (p.returncode == 0) == r["fits"] == (r["verdict"] == "FITS") == (r["peak_bytes"] <= r["hbm_bytes"])
    assert r["flops_per_step"] > 6 * trainable * 64 * 8192   # at least 6 N per trained token


def test_attention_resolves_for_the_target_platform_not_the_host():
    """"auto" is splash for a TPU target and cudnn for a GPU target on this CPU host; a kernel
    the target lacks, or an unknown name, is a config error naming the key."""
    sys.path.insert(0, REPO)
    from configs.stage1 import get_config

    from ilvr_jax import aot

    c = get_config("debug")
    c.model.compute_dtype = "bfloat16"
    for name, platform, want in [("auto", "tpu", "splash"), ("auto", "gpu", "cudnn"), ("xla", "tpu", "xla"),
                                 ("splash", "tpu", "splash"), ("cudnn", "gpu", "cudnn")]:
        c.model.attn_impl = name
        assert aot.attention_impl(c, platform) == want, (name, platform)
        assert aot.with_attention_impl(c, want).model.attn_impl == want and c.model.attn_impl == name
    c.model.attn_impl, c.model.compute_dtype = "auto", "float32"  # cuDNN has no fp32 kernel
    assert aot.attention_impl(c, "gpu") == "xla" and aot.attention_impl(c, "tpu") == "splash"
    for name, platform, message in [("cudnn", "tpu", "needs NVIDIA GPUs"), ("splash", "gpu", "is a TPU kernel"),
                                    ("flash", "tpu", "unknown attention implementation 'flash'")]:
        c.model.attn_impl = name
        with pytest.raises(aot.ConfigError, match=f"model.attn_impl.*{message}"):
            aot.attention_impl(c, platform)


def test_bad_flags_exit_2_with_one_line():
    for args, message in [
        ((f"--config={STAGE1}:debug",), "no --topology and the preset names none"),
        ((f"--config={STAGE1}:v5p_8", "--topology=v5p-7"), "no v5p slice of 7 TensorCores"),
        ((f"--config={STAGE1}:v5p_8", "--config.data.nosuch=1"), "unknown config key 'data.nosuch'"),
        ((f"--config={STAGE1}:gpu_8", "--config.mesh.shape=(1,3,1)"), "needs 3 devices, the topology has 8"),
        ((f"--config={STAGE1}:gpu_8", "--config.optim.grad_accum_steps=64"),
         "micro-batch (64 / 64 accumulation steps = 1) must be divisible by data x fsdp = 8"),
        ((f"--config={STAGE1}:gpu_8", "--config.model.attn_impl=splash"), "'splash' is a TPU kernel"),
    ]:
        p = run_aot(*args, timeout=300)
        assert p.returncode == 2, (args, p.stdout[-2000:], p.stderr[-2000:])
        assert p.stderr.strip().count("\n") == 0 and message in p.stderr, (args, p.stderr[-2000:])


# ----------------------------------------------------------------------------- libtpu
def test_libtpu_topologies_and_their_hbm(libtpu):
    code = ("from ilvr_jax import aot\nfrom ilvr_jax.train import mesh as m\n"
            "for n in ('v5p-8', 'v5e-16', 'v5e-8', 'v5p-16'):\n"
            "    t = aot.load_topology(aot.resolve_target(n)[1])\n"
            "    print(n, len(t.devices), t.devices[0].device_kind, "
            "aot.probe_hbm_bytes(m.make_mesh((1, -1, 1), list(t.devices))))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line.split()[0]: line.split(None, 1)[1] for line in p.stdout.splitlines()}
    gib = lambda x: round(x / 2**30, 2)  # noqa: E731
    got = {k: (int(v.split()[0]), v.rsplit(None, 1)[0].split(None, 1)[1], gib(int(v.split()[-1])))
           for k, v in rows.items()}
    assert got == {"v5p-8": (4, "TPU v5", 95.74), "v5e-16": (16, "TPU v5 lite", 15.75),
                   "v5e-8": (8, "TPU v5 lite", 15.75), "v5p-16": (8, "TPU v5", 95.74)}
    assert "Traceback" not in p.stderr


def test_splash_lowers_to_the_tpu_kernel_on_a_tpu_mesh(libtpu):
    """On a mesh of TPU devices (a libtpu topology, from this CPU host) the splash path is the
    Mosaic kernel inside shard_map, not Pallas interpret mode (which CPU meshes get)."""
    code = ("import jax, jax.numpy as jnp\n"
            "from jax.sharding import NamedSharding, PartitionSpec as P\n"
            "from ilvr_jax import aot, sharding\nfrom ilvr_jax.model import layers\n"
            "from ilvr_jax.train import mesh as m\n"
            "mesh = m.make_mesh((1, 2, 2), list(aot.load_topology('v5e:2x2').devices))\n"
            "sd = lambda s, d, *p: jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, P(*p)))\n"
            "q = sd((2, 256, 4, 128), jnp.bfloat16, 'fsdp', None, 'tensor', None)\n"
            "k = sd((2, 256, 2, 128), jnp.bfloat16, 'fsdp', None, 'tensor', None)\n"
            "ids = sd((2, 256), jnp.int32, 'fsdp', None)\n"
            "f = lambda q, k, v, i: layers.attention(q, k, v, layers.SegmentMask(i, i, causal=True), 'splash')\n"
            "with sharding.activation_mesh(mesh):\n"
            "    text = jax.jit(f).lower(q, k, k, ids).as_text()\n"
            "print('tpu_custom_call' in text, 'manual_computation' in text)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["True", "True"], p.stdout


@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_step_compiles_for_v5e_and_its_numbers_agree(libtpu, stage):
    from ilvr_jax import aot

    config = f"{STAGE1 if stage == 1 else STAGE2}:debug"
    # Stage 1 with "auto": the TPU target (not this CPU host) picks the splash kernel, which
    # must compile for it inside the sharded step (text decoder and vision tower); stage 2
    # with XLA's attention.
    impl = "auto" if stage == 1 else "xla"
    p = run_aot(f"--config={config}", *TINY_V5E, f"--config.model.attn_impl={impl}", "--json")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = _report(p)
    assert r["verdict"] == "FITS" and r["fits"] and r["stage"] == stage and r["source"] == "compiler"
    assert r["attn_impl"] == ("splash" if stage == 1 else "xla")
    assert r["device_kind"] == "TPU v5 lite" and r["devices"] == 4 and r["mesh"] == [1, 4, 1]
    assert r["hbm_bytes"] == int(15.75 * 2**30)
    # The compiler's view of the inputs is the state and batch shards we laid out (TPU tiling
    # pads small arrays, hence the margin), less the inputs the step does not read: stage 2
    # has no teacher, so no helper images (one sample's 768 x 1176 fp32 patches per chip).
    helper_images = 0 if stage == 1 else 768 * 1176 * 4
    assert helper_images <= r["unused_input_bytes"] <= helper_images + 1024
    expected_args = r["state_bytes_per_device"] + r["batch_bytes_per_device"] - r["unused_input_bytes"]
    assert expected_args <= r["argument_bytes"] <= 1.25 * expected_args, (r["argument_bytes"], expected_args)
    # (temp_bytes sums every scratch buffer, live at once or not, so it may exceed the peak.)
    assert r["compiler_peak_bytes"] >= r["argument_bytes"] > 0 and r["temp_bytes"] > 0
    assert r["peak_bytes"] == r["compiler_peak_bytes"] + r["unused_input_bytes"]
    # The state is donated: its outputs alias the inputs.
    assert r["alias_bytes"] >= 0.9 * r["state_bytes_per_device"]
    # Sharded, not replicated: per device about a quarter of the state (norms stay whole).
    assert r["state_bytes_per_device"] <= 0.35 * r["state_bytes"]
    assert r["replicated_large_leaves"] == 0 and r["flops_per_step"] > 0
    sys.path.insert(0, REPO)
    cfg_module = __import__("configs.stage1" if stage == 1 else "configs.stage2", fromlist=["get_config"])
    c = cfg_module.get_config("debug")
    c.mesh.shape, c.data.batch_size = (1, 4, 1), 4
    text = aot.format_report(c, r)
    assert text.splitlines()[-1].startswith("verdict: FITS (peak ") and "of 15.75 GiB per device" in text


def test_impossible_setting_reports_does_not_fit(libtpu, tmp_path):
    # 65536 tokens x 4 heads of fp32 attention scores (XLA's attention) are 64 GiB per v5e chip.
    log = tmp_path / "compiler.txt"
    p = run_aot(f"--config={STAGE1}:debug", *TINY_V5E, "--config.data.max_length=65536",
                "--config.model.attn_impl=xla", f"--compiler_log={log}")
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[-2].startswith("verdict: DOES NOT FIT (needs ") and "of 15.75 GiB per device" in lines[-2], p.stdout
    assert "suggestions:" in p.stdout and "max_length" in p.stdout
    assert lines[-1] == f"the compiler's whole message: {log}"
    assert log.read_text().startswith("RESOURCE_EXHAUSTED") and "HBM" in log.read_text()


def test_generation_compiles_for_v5e_and_its_cache_counts(libtpu):
    """--generate: the evaluation's prefill + decode loop compiles for the TPU target, and
    raising the generation budget from 64 to 4096 new tokens raises the peak by at least the
    KV cache of the extra slots (k and v of every layer, one row per chip; measured: 12.1 ->
    24.1 MB for 3.1 MB of extra cache before TPU tiling pads it)."""
    from ilvr_jax import aot

    base = ["--config=" + f"{STAGE1}:debug", *TINY_V5E, "--generate", "--json", "--config.train.eval_batch_size=4",
            "--config.data.max_length=256"]
    reports = []
    for new in (64, 4096):
        p = run_aot(*base, f"--config.train.eval_max_new_tokens={new}")
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        r = _report(p)
        assert r["program"] == "generation" and r["verdict"] == "FITS" and r["source"] == "compiler"
        assert r["rows"] == 4 and r["prompt_tokens"] == 256 and r["new_tokens"] == new
        assert r["peak_bytes"] >= r["argument_bytes"] > 0 and r["temp_bytes"] > 0
        reports.append(r)
    sys.path.insert(0, REPO)
    from configs import stage1

    t = aot.model_config(stage1.get_config("debug")).text
    extra_cache = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * (4096 - 64) * 4
    assert reports[1]["peak_bytes"] - reports[0]["peak_bytes"] >= extra_cache, (reports[0]["peak_bytes"],
                                                                                 reports[1]["peak_bytes"], extra_cache)



def test_model_config_reads_bucket_model_dirs_and_stage1_workdirs_as_local_ones(tmp_path):
    """``model.hf_dir`` and stage 2's ``train.init_from`` in a gs:// bucket give the
    ModelConfig the same local directories give (a hub-layout download; a stage-1 workdir's
    model config)."""
    from ilvr_jax import aot, storage
    from ilvr_jax.demo import load_config
    from ilvr_jax.train.run_model import MODEL_CONFIG_FILE

    hub = _load_test_module("_hub", "hub_download.py")
    fake_bucket = _load_test_module("_fb", "fake_bucket.py")
    local = hub.build_hub_download(str(tmp_path / "Qwen2.5-VL-tiny"))
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    c1 = load_config("stage1.py", "debug")
    c1.model.init, c1.model.hf_dir = "hf", local
    want = aot.model_config(c1)
    (stage1 / MODEL_CONFIG_FILE).write_text(json.dumps(want.replace(latent_size=None).to_hf_dict()))
    c2 = load_config("stage2.py", "debug")
    c2.train.init_from = str(stage1)
    want2 = aot.model_config(c2)
    with fake_bucket.install():
        storage.copy_tree(local, "gs://models/Qwen2.5-VL-tiny")
        storage.copy_tree(str(stage1), "gs://runs/stage1")
        c1.model.hf_dir = "gs://models/Qwen2.5-VL-tiny"
        c2.train.init_from = "gs://runs/stage1"
        assert aot.model_config(c1) == want
        assert aot.model_config(c2) == want2
        c2.train.init_from = "gs://runs/nothing"
        with pytest.raises(aot.ConfigError, match="gs://runs/nothing/.* does not exist"):
            aot.model_config(c2)
    assert want2.latent_size == int(c2.ilvr.latent_size) and want2.text.vocab_size == want.text.vocab_size


def _load_test_module(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load()
