#!/bin/bash
# The same training command on every worker of a TPU VM pod; jax.distributed finds the workers
# itself (COMA_DISTRIBUTED=auto). From the repository root:
#
#   launch/tpu/run.sh [--dry-run] [--no-install] [--python CMD] --tpu NAME --zone ZONE [--project P] \
#       -- CONFIG WORKDIR [train args...]
#
# It copies the repository (the files git tracks or would track: no .venv, no runs) to ~/coma_jax
# on every worker, installs it there with the TPU extra, then starts the training on all workers at
# once. WORKDIR and the data must be where every worker sees them: a gs:// path or a shared mount.
# --dry-run prints the gcloud commands instead of running them; --python names the workers'
# interpreter (default python3); --no-install skips the install of a rerun.
# Ctrl-C here ends the ssh sessions, not necessarily the training on the workers.
set -euo pipefail

usage() {
  echo "usage: $0 [--dry-run] [--no-install] [--python CMD] --tpu NAME --zone ZONE [--project P] \\" >&2
  echo "           -- CONFIG WORKDIR [train args...]" >&2
  exit 2
}

dry_run=0
install=1
python=python3
tpu=
zone=
project=
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --no-install) install=0 ;;
    --python) python=${2:?--python needs a value}; shift ;;
    --tpu) tpu=${2:?--tpu needs a value}; shift ;;
    --zone) zone=${2:?--zone needs a value}; shift ;;
    --project) project=${2:?--project needs a value}; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
  shift
done
if [[ -z "$tpu" || -z "$zone" ]] || (($# < 2)); then
  usage
fi
config=$1
workdir=$2
shift 2
if [[ "$workdir" != *://* ]]; then
  echo "note: every worker must see WORKDIR $workdir (a gs:// path, or a mount they share)" >&2
fi

repo=$(cd "$(dirname "$0")/../.." && pwd)
where=(--zone "$zone")
if [[ -n "$project" ]]; then
  where+=(--project "$project")
fi
tpu_vm=(gcloud compute tpus tpu-vm)

# One string for the workers' shell, each argument quoted for it.
quoted() {
  printf '%q' "$1"
  shift
  if (($#)); then
    printf ' %q' "$@"
  fi
}
install_cmd="cd coma_jax && $(quoted "$python") -m pip install -q -c constraints.txt -e '.[tpu]'"
train_cmd="cd coma_jax && COMA_DISTRIBUTED=auto $(quoted "$python" -m coma_jax.train \
  --config "$config" --workdir "$workdir" "$@")"

# A command as it would be typed: plain words bare, the others single-quoted.
shown() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[[:alnum:]_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("${arg@Q}")
    fi
  done
  echo "${out[*]}"
}

run() {
  if ((dry_run)); then
    shown "$@"
  else
    "$@"
  fi
}

if ((install)); then
  if ((dry_run)); then
    stage=TMP
    echo '# TMP: a temporary folder, coma_jax in it a copy of the files git lists'
  else
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    mkdir "$stage/coma_jax"
    # Tracked and untracked-but-not-ignored files that exist (a deleted tracked file is skipped).
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' file; do
        if [[ -e "$repo/$file" ]]; then
          printf '%s\0' "$file"
        fi
      done |
      tar -C "$repo" --null -T - -cf - | tar -C "$stage/coma_jax" -xf -
  fi
  # Destination "NAME:" is each worker's home directory: the copy lands in ~/coma_jax.
  run "${tpu_vm[@]}" scp --recurse "$stage/coma_jax" "$tpu:" --worker=all "${where[@]}"
  run "${tpu_vm[@]}" ssh "$tpu" --worker=all "${where[@]}" --command "$install_cmd"
fi
run "${tpu_vm[@]}" ssh "$tpu" --worker=all "${where[@]}" --command "$train_cmd"
