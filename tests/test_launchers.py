"""launch_tpu.sh and launch/slurm_gpu.sbatch: their dry runs, their errors, and a real run of
launch_tpu.sh against a stand-in gcloud whose workers are directories on this machine (no cloud,
no Slurm). Arguments go through the same shell parsing as on the workers, so quoting bugs show."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TPU = os.path.join(REPO, "launch_tpu.sh")
SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
BASH = shutil.which("bash")
# Arguments that break naive quoting: spaces, both quote kinds, a glob, $, and an empty one.
TRICKY = ["--workdir", "runs/my run", "--config.data.answer_format=it's \"{answer}\" $HOME *", ""]
LOC = ["--zone", "us-east5-a", "--project", "my-proj"]


def _run(script, *args, env=None, path=None, cwd=None):
    e = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE",
                                                         "RUNTIME_VERSION", "DRY_RUN")}
    e.update(env or {})
    if path is not None:
        e["PATH"] = path
    return subprocess.run([BASH, script, *args], env=e, cwd=cwd or REPO, capture_output=True, text=True, timeout=120)


def _lines(p):
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def _remote_argv(line):
    """The argv of the command that ``gcloud ... ssh --command CMD`` runs on a worker."""
    argv = shlex.split(line)
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], line
    return shlex.split(argv[argv.index("--command") + 1])


def _path_without_gcloud(tmp_path):
    """A PATH holding only the plain tools the scripts use (no gcloud, no srun)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "sed", "head", "seq", "nproc"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    return str(bin_dir)


def test_tpu_dry_run_prints_every_step_in_order_with_the_arguments_intact():
    p = _run(LAUNCH_TPU, "--name", "ilvr-s1", *LOC, "--accelerator-type", "v5litepod-16", "--spot", "--dry-run",
             "--", "--config", "configs/stage1.py:v5e_16", *TRICKY)
    create, tarball, scp, extract, install, train, collect = _lines(p)
    assert shlex.split(create) == (
        "gcloud compute tpus tpu-vm describe ilvr-s1 --zone=us-east5-a --project=my-proj >/dev/null 2>&1 || "
        "gcloud compute tpus tpu-vm create ilvr-s1 --zone=us-east5-a --project=my-proj "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot").split()
    assert f"git -C {REPO} ls-files" in tarball and "tar " in tarball
    tar = shlex.split(tarball)[-1]
    assert shlex.split(scp) == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar, "ilvr-s1:ilvr_jax.tar.gz",
                                "--zone=us-east5-a", "--project=my-proj", "--worker=all"]
    assert "--worker=all" in shlex.split(extract) and "tar -xzf ilvr_jax.tar.gz -C ilvr_jax" in extract
    assert "--worker=all" in shlex.split(install)
    assert ".venv/bin/pip install -q -e .[tpu]" in " ".join(_remote_argv(install))
    assert "--worker=all" in shlex.split(train)
    remote = _remote_argv(train)
    start = remote.index("ilvr_jax.main") + 1
    assert remote[start:remote.index("2>&1")] == ["--config", "configs/stage1.py:v5e_16", *TRICKY]
    assert "tee" in remote and "logs/ilvr-s1/worker-$W.log" in remote
    got = shlex.split(collect)
    assert got[:3] == ["mkdir", "-p", f"{REPO}/logs/ilvr-s1"]
    assert got[4:] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "ilvr-s1:ilvr_jax/logs/ilvr-s1/worker-*.log",
                       f"{REPO}/logs/ilvr-s1/", "--zone=us-east5-a", "--project=my-proj", "--worker=all"]


def test_tpu_dry_run_of_a_queued_resource_from_a_git_ref_reads_the_environment():
    env = {"TPU_NAME": "ilvr-q", "ZONE": "us-central1-a", "PROJECT": "p", "ACCELERATOR_TYPE": "v5p-16"}
    p = _run(LAUNCH_TPU, "--queued", "--repo", "https://example.com/org/ilvr_jax.git@feature/x", "--dry-run",
             "--", "--workdir", "w", env=env)
    create, wait, clone, install, train, collect = _lines(p)
    assert ("gcloud compute tpus queued-resources create ilvr-q --node-id=ilvr-q --zone=us-central1-a --project=p "
            "--accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5") in create
    assert "--spot" not in create
    assert "queued-resources describe ilvr-q" in wait and "ACTIVE" in wait
    remote = " ".join(_remote_argv(clone))
    assert "git clone https://example.com/org/ilvr_jax.git ilvr_jax" in remote
    assert "git fetch origin feature/x" in remote
    assert "ilvr_jax.main --workdir w" in " ".join(_remote_argv(train))


def test_tpu_delete_dry_run_prints_only_the_delete():
    assert _lines(_run(LAUNCH_TPU, "--name", "ilvr-s1", *LOC, "--delete", "--dry-run")) == [
        "gcloud compute tpus tpu-vm delete ilvr-s1 --zone=us-east5-a --project=my-proj --quiet"]
    assert _lines(_run(LAUNCH_TPU, "--name", "ilvr-s1", *LOC, "--queued", "--delete", "--dry-run")) == [
        "gcloud compute tpus queued-resources delete ilvr-s1 --zone=us-east5-a --project=my-proj --force --quiet"]


@pytest.mark.parametrize("args, env, message", [
    (["--name", "n", *LOC, "--", "--workdir", "w"], {}, "gcloud not found on PATH"),
    (["--name", "n", "--zone", "z", "--dry-run"], {}, "no project"),
    (["--name", "n", "--project", "p", "--dry-run"], {}, "no zone"),
    (["--zone", "z", "--project", "p", "--dry-run"], {}, "no TPU name"),
    (["--name", "n", *LOC, "--accelerator-type", "v9-8", "--dry-run"], {}, "--runtime-version"),
    (["--name", "n", *LOC, "--workdir", "w"], {}, "unknown option '--workdir'"),
])
def test_tpu_errors_are_one_line_and_exit_2(tmp_path, args, env, message):
    p = _run(LAUNCH_TPU, *args, env=env, path=_path_without_gcloud(tmp_path))
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("error: ") and message in p.stderr, p.stderr


FAKE_GCLOUD = r'''#!PYTHON
"""A stand-in gcloud: workers are directories WORKERS/worker-N (their home directories)."""
import glob, json, os, shutil, subprocess, sys
workers = sorted(glob.glob(os.path.join(os.environ["FAKE_WORKERS"], "worker-*")))
argv = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(argv) + "\n")
if argv[:3] == ["config", "get-value", "project"]:
    print(os.environ.get("FAKE_PROJECT", "(unset)"))
    sys.exit(0)
verb = argv[3]
pos = [a for a in argv[4:] if not a.startswith("--")]
if verb == "describe":
    sys.exit(1)  # nothing exists yet
if verb == "scp":
    src, dst = pos[0], pos[1]
    for w in workers:
        if ":" in src:  # worker -> here
            for f in glob.glob(os.path.join(w, src.split(":", 1)[1])):
                shutil.copy(f, dst)
        else:
            shutil.copy(src, os.path.join(w, dst.split(":", 1)[1]))
if verb == "ssh":
    cmd = argv[argv.index("--command") + 1]
    rcs = [subprocess.run(["bash", "-c", cmd], cwd=w, env=dict(os.environ, FAKE_WORKER=w[-1])).returncode
           for w in workers]
    sys.exit(max(rcs))
'''
FAKE_TOOLS = {
    # The metadata server's agent-worker-number.
    "curl": "#!/bin/sh\necho \"$FAKE_WORKER\"\n",
    # `python3 -m venv .venv`: a venv whose pip does nothing and whose python is the one below.
    "python3": "#!/bin/sh\nmkdir -p .venv/bin && cp \"$FAKE_BIN/pip\" \"$FAKE_BIN/python\" .venv/bin/\n",
    "pip": "#!/bin/sh\nexit 0\n",
    # The training command: records what it was given, prints a line, exits with FAKE_EXIT.
    "python": textwrap.dedent("""\
        #!PYTHON
        import json, os, sys
        print("training on", os.environ["FAKE_WORKER"])
        json.dump({"argv": sys.argv[1:], "XLA_FLAGS": os.environ.get("XLA_FLAGS")}, open("ran.json", "w"))
        sys.exit(int(os.environ.get("FAKE_EXIT", 0)))
        """),
}


@pytest.fixture
def fake_cloud(tmp_path):
    """(checkout with launch_tpu.sh, env with the stand-in gcloud on PATH, worker homes, calls file)."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(LAUNCH_TPU, checkout / "launch_tpu.sh")
    (checkout / "code.py").write_text("print('hello')\n")
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    bin_dir, fake_bin = tmp_path / "bin", tmp_path / "fake_venv"
    bin_dir.mkdir()
    fake_bin.mkdir()
    for name, text in {"gcloud": FAKE_GCLOUD, "curl": FAKE_TOOLS["curl"], "python3": FAKE_TOOLS["python3"]}.items():
        (bin_dir / name).write_text(text.replace("#!PYTHON", "#!" + sys.executable))
        (bin_dir / name).chmod(0o755)
    for name in ("pip", "python"):
        (fake_bin / name).write_text(FAKE_TOOLS[name].replace("#!PYTHON", "#!" + sys.executable))
        (fake_bin / name).chmod(0o755)
    workers = tmp_path / "workers"
    for i in range(2):
        (workers / f"worker-{i}").mkdir(parents=True)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_WORKERS": str(workers), "FAKE_BIN": str(fake_bin),
           "FAKE_CALLS": str(tmp_path / "calls.jsonl"), "TMPDIR": str(tmp_path), "FAKE_PROJECT": "my-proj"}
    return checkout, env, workers, tmp_path / "calls.jsonl"


def test_tpu_run_copies_installs_runs_on_every_worker_and_collects_each_log(fake_cloud):
    checkout, env, workers, calls = fake_cloud
    env["FAKE_EXIT"] = "3"
    p = _run(str(checkout / "launch_tpu.sh"), "--name", "ilvr-s1", "--zone", "z", "--env", "XLA_FLAGS=--a --b",
             "--", *TRICKY, env=env, cwd=str(checkout))
    assert p.returncode == 3, p.stderr  # the training command's status
    assert "[worker 0] training on 0" in p.stdout and "[worker 1] training on 1" in p.stdout
    for i in range(2):
        home = workers / f"worker-{i}"
        assert (home / "ilvr_jax" / "code.py").read_text() == "print('hello')\n"
        ran = json.loads((home / "ilvr_jax" / "ran.json").read_text())
        assert ran == {"argv": ["-m", "ilvr_jax.main", *TRICKY], "XLA_FLAGS": "--a --b"}
        collected = checkout / "logs" / "ilvr-s1" / f"worker-{i}.log"
        assert collected.read_text() == f"training on {i}\n"
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert made[0] == ["config", "get-value", "project"]  # the project came from gcloud's config
    assert [c[3] for c in made[1:]] == ["describe", "create", "scp", "ssh", "ssh", "ssh", "scp"]
    assert "--project=my-proj" in made[2]


def test_tpu_run_without_a_project_anywhere_stops_before_any_cloud_command(fake_cloud):
    checkout, env, _, calls = fake_cloud
    del env["FAKE_PROJECT"]
    p = _run(str(checkout / "launch_tpu.sh"), "--name", "n", "--zone", "z", "--", "--workdir", "w", env=env)
    assert p.returncode == 2 and p.stderr.startswith("error: no project") and len(p.stderr.splitlines()) == 1
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [["config", "get-value", "project"]]


def test_slurm_dry_run_prints_one_process_per_host_with_all_local_gpus():
    p = _run(SBATCH, *TRICKY, env={"DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "3"})
    export, srun = _lines(p)
    assert export == "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"
    argv = shlex.split(srun)
    assert argv[:3] == ["srun", "--nodes=3", "--ntasks-per-node=1"] and "--kill-on-bad-exit=1" in argv
    start = argv.index("ilvr_jax.main") + 1
    assert argv[start:] == ["--config", "configs/stage1.py:gpu_8", "--config.mesh.distributed=True",
                            "--config.mesh.shape=(3,8,1)", *TRICKY]
    # Outside a job the node count is the file's own #SBATCH default; CONFIG picks the stage.
    srun = _lines(_run(SBATCH, env={"DRY_RUN": "1", "CONFIG": "configs/stage2.py:gpu_8"}))[1]
    assert "--nodes=2 " in srun and "--config configs/stage2.py:gpu_8" in srun and "(2,8,1)" in srun


def test_slurm_script_outside_slurm_says_to_use_sbatch(tmp_path):
    p = _run(SBATCH, "--workdir", "w", path=_path_without_gcloud(tmp_path))
    assert p.returncode == 2 and p.stderr.startswith("error: srun not found") and len(p.stderr.splitlines()) == 1


SLURM_PROBE = textwrap.dedent("""\
    import json, sys
    import jax
    from jax._src import clusters
    # What jax.distributed.initialize() derives from this environment ...
    address, n, pid, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 60)
    jax.distributed.initialize()  # ... and the real thing, as training calls it (no mesh.* addresses)
    print(json.dumps({"argv": sys.argv[1:], "address": address, "default_local_ids": local,
                      "process_count": jax.process_count(),
                      "visible": jax.config.read("jax_cuda_visible_devices")}))
    jax.distributed.shutdown()
    """)


def test_slurm_environment_gives_jax_every_gpu_of_the_host(tmp_path):
    """srun's variables for a one-task step + the job's JAX_LOCAL_DEVICE_IDS: jax finds the
    Slurm cluster, and the process keeps all 8 GPUs (without the variable it would keep GPU 0)."""
    export = _lines(_run(SBATCH, "--workdir", "w", env={"DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "1"}))[0]
    key, value = export.removeprefix("export ").split("=", 1)
    probe = tmp_path / "probe.py"
    probe.write_text(SLURM_PROBE)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "1", "JAX_PLATFORMS": "cpu"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_LOCAL"))}
    p = subprocess.run([sys.executable, str(probe)], env={**env, **slurm, key: value},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.splitlines()[-1])
    assert got["address"] == f"localhost:{4242 % 4096 + 61440}" and got["process_count"] == 1
    assert got["default_local_ids"] == [0]
    assert got["visible"] == "0,1,2,3,4,5,6,7"
