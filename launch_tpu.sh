#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create (or reuse) it, copy this checkout (or clone a
# repository) to every worker, install ilvr_jax with the `tpu` extra, and run the same
# `python -m ilvr_jax.main ...` on all workers; jax.distributed.initialize() finds the pod
# by itself, so every worker runs the identical command.
#
#   ./launch_tpu.sh --name ilvr-s1 --zone us-east5-a --accelerator-type v5p-8 -- \
#       --config configs/stage1.py:v5p_8 --workdir /mnt/shared/runs/s1 \
#       --config.model.hf_dir=/mnt/shared/Qwen2.5-VL-7B-Instruct --config.data.train_path=...
#   ./launch_tpu.sh --name ilvr-s1 --zone us-east5-a --delete
#
# Paths are the workers' own. With more than one worker (v5p-16, v5litepod-16, ...) the workdir
# must be a filesystem they all see (Filestore NFS, a gcsfuse mount of a bucket): checkpoints
# are written by all workers together and process 0's files are read by the others.
#
# Options (environment variable in brackets):
#   --name NAME              TPU VM / queued resource name [TPU_NAME] (required)
#   --zone ZONE              [ZONE] (required)
#   --project PROJECT        [PROJECT] (default: `gcloud config get-value project`)
#   --accelerator-type TYPE  v5p-8, v5litepod-16, ... [ACCELERATOR_TYPE] (default v5p-8)
#   --runtime-version V      TPU software version [RUNTIME_VERSION] (default: by TPU generation)
#   --queued                 create a queued resource and wait until it is ACTIVE
#   --spot                   spot capacity
#   --repo URL[@REF]         `git clone` URL on the workers (REF: after the last '@', a branch,
#                            tag or commit) instead of copying a tarball of this checkout
#   --env KEY=VALUE          environment variable for the training command (repeatable)
#   --skip-install           reuse the code and environment already on the workers
#   --delete                 delete the TPU VM / queued resource (after the run, if one is given)
#   --dry-run                print every command, one per line in order, and run none (only
#                            the default project is read from gcloud's config, when not given)
# Everything after `--` is passed to `python -m ilvr_jax.main` unchanged. Each worker's output
# streams here prefixed with `[worker N]` and is collected into logs/NAME/worker-N.log.
#
# Exit status: the training command's status; 2 for bad options or a missing gcloud.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REMOTE_DIR="ilvr_jax"  # relative to the worker's home directory (where ssh commands start)
PROG="launch_tpu.sh"

die() { echo "error: $*" >&2; exit 2; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
QUEUED=0 SPOT=0 DELETE=0 DRY_RUN=0 SKIP_INSTALL=0
REPO=""
ENV_VARS=()
MAIN_ARGS=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see $PROG --help)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE="$2"; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME_VERSION="$2"; shift 2 ;;
    --repo) need_value "$@"; REPO="$2"; shift 2 ;;
    --env) need_value "$@"; [[ "$2" == [A-Za-z_]*=* ]] || die "--env wants KEY=VALUE, got '$2'"
           ENV_VARS+=("$2"); shift 2 ;;
    --name=*|--zone=*|--project=*|--accelerator-type=*|--runtime-version=*|--repo=*|--env=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --delete) DELETE=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (arguments for ilvr_jax.main go after '--'; see $PROG --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "no TPU name: pass --name NAME or set TPU_NAME"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "TPU name '$NAME' must be lowercase letters, digits and '-'"
[[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE or set ZONE (e.g. us-east5-a)"
if [[ $DRY_RUN -eq 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found on PATH (install the Google Cloud SDK: https://cloud.google.com/sdk/docs/install)"
fi
if [[ -z "$PROJECT" ]] && command -v gcloud >/dev/null 2>&1; then
  PROJECT="$(gcloud config get-value project 2>/dev/null || true)"
  [[ "$PROJECT" == "(unset)" ]] && PROJECT=""
fi
[[ -n "$PROJECT" ]] || die "no project: pass --project PROJECT, set PROJECT, or run 'gcloud config set project PROJECT'"

if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
    v5litepod-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
    v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    *) die "no default runtime version for accelerator type '$ACCELERATOR_TYPE': pass --runtime-version" ;;
  esac
fi

# One shell-quoted string from arguments (each survives one round of shell parsing): plain
# words as they are, anything else in single quotes.
quote() {
  local out="" a q="'\\''"
  for a in "$@"; do
    [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]] || a="'${a//\'/$q}'"
    out+="${out:+ }$a"
  done
  printf '%s' "$out"
}

# Runs one shell line, or prints it under --dry-run. Every step goes through here, so the
# dry run shows exactly what a real run executes.
step() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '%s\n' "$1"
  else
    printf '+ %s\n' "$1" >&2
    bash -c "set -euo pipefail; $1"
  fi
}

LOC=(--zone="$ZONE" --project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)

# A command run on every worker (`ssh --worker=all`); the remote login shell parses it once.
on_workers() { quote "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command "$1"; }

delete_tpu() {
  if [[ $QUEUED -eq 1 ]]; then
    step "$(quote "${QR[@]}" delete "$NAME" "${LOC[@]}" --force --quiet)"  # --force: the node too
  else
    step "$(quote "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet)"
  fi
}

if [[ $DELETE -eq 1 && ${#MAIN_ARGS[@]} -eq 0 ]]; then
  delete_tpu
  exit 0
fi

# 1. Create, or reuse what exists under that name.
SPOT_FLAG=()
[[ $SPOT -eq 1 ]] && SPOT_FLAG=(--spot)
if [[ $QUEUED -eq 1 ]]; then
  STATE="$(quote "${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)')"
  step "$(quote "${QR[@]}" describe "$NAME" "${LOC[@]}") >/dev/null 2>&1 || $(quote "${QR[@]}" create "$NAME" \
    --node-id="$NAME" "${LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
    "${SPOT_FLAG[@]}")"
  step "until s=\$($STATE) && [ \"\$s\" = ACTIVE ]; do case \"\$s\" in FAILED|SUSPENDED) echo \"error: queued resource $NAME is \$s\" >&2; exit 1;; esac; echo \"queued resource $NAME: \${s:-pending}\" >&2; sleep 30; done"
else
  step "$(quote "${TPU[@]}" describe "$NAME" "${LOC[@]}") >/dev/null 2>&1 || $(quote "${TPU[@]}" create "$NAME" \
    "${LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${SPOT_FLAG[@]}")"
fi

# 2. The code on every worker, and 3. the environment.
if [[ $SKIP_INSTALL -eq 0 ]]; then
  if [[ -n "$REPO" ]]; then
    URL="$REPO" REF="HEAD"
    # The ref follows the last '@' unless that part holds a ':' (git@host:org/repo.git).
    if [[ "$REPO" == *@* && "${REPO##*@}" != *:* ]]; then URL="${REPO%@*}" REF="${REPO##*@}"; fi
    step "$(on_workers "{ [ -d $(quote "$REMOTE_DIR")/.git ] || git clone $(quote "$URL" "$REMOTE_DIR"); } && cd $(quote "$REMOTE_DIR") && git fetch origin $(quote "$REF") && git checkout --detach FETCH_HEAD")"
  else
    TARBALL="${TMPDIR:-/tmp}/ilvr_jax-$NAME.tar.gz"
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      # Tracked and untracked-but-not-ignored files: the checkout as it is, without .venv or runs.
      step "git -C $(quote "$ROOT") ls-files -z --cached --others --exclude-standard | tar -C $(quote "$ROOT") --null --files-from=- --ignore-failed-read -czf $(quote "$TARBALL")"
    else
      step "tar -C $(quote "$ROOT") --exclude=./.venv --exclude=./runs --exclude=./logs -czf $(quote "$TARBALL") ."
    fi
    step "$(quote "${TPU[@]}" scp "$TARBALL" "$NAME:$REMOTE_DIR.tar.gz" "${LOC[@]}" --worker=all)"
    step "$(on_workers "mkdir -p $(quote "$REMOTE_DIR") && tar -xzf $(quote "$REMOTE_DIR.tar.gz") -C $(quote "$REMOTE_DIR")")"
  fi
  # python3-venv is missing on some TPU images; pip's libtpu wheel comes with jax[tpu].
  step "$(on_workers "cd $(quote "$REMOTE_DIR") && { python3 -m venv .venv || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv .venv; }; } && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'")"
fi

# 4. The same training command on every worker, 5. each worker's log collected here.
STATUS=0
if [[ ${#MAIN_ARGS[@]} -gt 0 ]]; then
  LOG_DIR="logs/$NAME"
  WORKER_ID='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
  TRAIN="$(quote env PYTHONUNBUFFERED=1 "${ENV_VARS[@]}" .venv/bin/python -m ilvr_jax.main "${MAIN_ARGS[@]}")"
  REMOTE="set -o pipefail; cd $(quote "$REMOTE_DIR") && W=$WORKER_ID && mkdir -p $(quote "$LOG_DIR") && $TRAIN 2>&1 | tee $(quote "$LOG_DIR")/worker-\$W.log | sed -u \"s/^/[worker \$W] /\""
  step "$(on_workers "$REMOTE")" || STATUS=$?
  step "mkdir -p $(quote "$ROOT/$LOG_DIR") && $(quote "${TPU[@]}" scp "$NAME:$REMOTE_DIR/$LOG_DIR/worker-*.log" "$ROOT/$LOG_DIR/" "${LOC[@]}" --worker=all)" \
    || echo "warning: could not collect the worker logs into $ROOT/$LOG_DIR" >&2
fi

[[ $DELETE -eq 1 ]] && delete_tpu
exit "$STATUS"
