#!/usr/bin/env bash
# The one command a lent GPU machine runs, from the repository root (docs/benchmarks.md has the two calls to paste):
#
#   bash bench/gpu_remote.sh --call 1     # gpu tests, U-Net and autoencoder steps, sampling (8 min budget)
#   bash bench/gpu_remote.sh --call 2     # the 2.8B U-Net under FSDP: steps, sharded checkpoint, resume (4.25 min)
#
# That machine has no network, no make and its own Python with PyTorch (bench/gpu_machine/packages.txt). So: no venv,
# no index. The wheels of what it lacks (`make gpu-wheels` here -> .whl/, carried by the device tool) are installed
# with --no-index --no-deps into a temporary folder, which goes on PYTHONPATH with the repository root. Then it prints
# nvidia-smi, df and the versions, puts the run's outputs on the disk with the most room, runs bench/gpu_check.py with
# the arguments given, copies the report and the step logs into $OUT (at most 8 files, one folder down: remote.log,
# gpu_check.md, gpu_check.json, logs/<step>.log) and exits with the check's status. Without CUDA, gpu_check.py runs
# its CPU dry run on tiny configs, so all of this can be rehearsed here (bench/gpu_rehearsal.py).
#
# Environment: PYTHON (default python3, the machine's own), OUT (default outputs/gpu_remote), WHEELS (default .whl),
# EMU_RUN_DIR (default: the candidate folder with the most free space, printed).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$ROOT/outputs/gpu_remote}
WHEELS=${WHEELS:-$ROOT/.whl}
started=$(date +%s)
mkdir -p "$OUT" || exit 2
exec > >(tee "$OUT/remote.log") 2>&1
tee_pid=$!

section() { printf '\n=== %s\n' "$*"; }
finish() {  # copy what comes back, then exit with the given status
  local rc=$1 report=${RUN:+$RUN/gpu_check}
  if [ -n "$report" ] && [ -d "$report" ]; then
    cp "$report"/gpu_check.md "$report"/gpu_check.json "$OUT"/ 2>/dev/null
    if compgen -G "$report/logs/*.log" >/dev/null; then mkdir -p "$OUT/logs" && cp "$report"/logs/*.log "$OUT/logs/"; fi
  fi
  section "done: rc $rc after $(($(date +%s) - started)) s; in $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
  exec >&- 2>&-  # let tee write the log's end before the device tool collects $OUT
  wait "$tee_pid" 2>/dev/null
  exit "$rc"
}

section "machine"
date -u '+%Y-%m-%d %H:%M:%S UTC'
uname -srm
if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found (no NVIDIA driver here)"; fi
echo "cpus: $(nproc); memory: $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo)"

section "disks"
# Candidates for the run's outputs (the 2.8B stage-1 checkpoint needs ~34-46 GB): the one with the most room wins.
candidates=("${TMPDIR:-/tmp}" /tmp /var/tmp /dev/shm "$ROOT/outputs" "${HOME:-/root}" /scratch /mnt /data /workspace)
mkdir -p "$ROOT/outputs" 2>/dev/null
df -h "${candidates[@]}" 2>/dev/null | awk 'NR == 1 || !seen[$0]++'
best="" best_kb=-1
for dir in "${candidates[@]}"; do
  [ -d "$dir" ] && [ -w "$dir" ] || continue
  kb=$(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 {print $4}')
  [ -n "$kb" ] && [ "$kb" -gt "$best_kb" ] && best=$dir best_kb=$kb
done
RUN=${EMU_RUN_DIR:-${best:+$best/emu_gpu_check}}
if [ -z "$RUN" ]; then echo "no writable folder for the run's outputs among: ${candidates[*]}"; finish 2; fi
mkdir -p "$RUN" || finish 2
echo "run outputs: $RUN ($(df -h "$RUN" | awk 'NR == 2 {print $4}') free$([ -n "${EMU_RUN_DIR:-}" ] && echo ', EMU_RUN_DIR'))"

section "wheels: $WHEELS -> a temporary folder on PYTHONPATH (no index, no dependencies)"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "no wheels in $WHEELS: run 'make gpu-wheels' on a machine that reaches the package index and carry .whl"
  finish 2
fi
SITE=$(mktemp -d "${TMPDIR:-/tmp}/emu-site.XXXXXX")
t0=$(date +%s)
if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "${wheels[@]}"; then
  echo "pip could not install the wheels offline (above); the check did not run"
  finish 2
fi
install_seconds=$(($(date +%s) - t0))
echo "${#wheels[@]} wheels in ${install_seconds} s: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
export TORCHINDUCTOR_CACHE_DIR="$RUN/inductor_cache" MPLCONFIGDIR="$RUN/matplotlib"

section "versions"
"$PYTHON" - <<'PY' || finish 2
import importlib.metadata as md, platform, sys

print(f"python {platform.python_version()} ({sys.executable})")
names = ("torch", "torchvision", "lightning", "transformers", "torchmetrics", "numpy", "safetensors", "tokenizers",
         "huggingface-hub", "diffusers", "hydra-core", "omegaconf", "antlr4-python3-runtime", "webdataset",
         "braceexpand", "clean-fid", "pytest", "timm", "einops", "scikit-image")
found = {}
for n in names:
    try:
        found[n] = md.version(n)
    except md.PackageNotFoundError:
        found[n] = "MISSING"
print(", ".join(f"{n} {v}" for n, v in found.items()))
import torch

print(f"torch CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
import emu, train  # noqa: F401  the package and the entry point import with what is here
print(f"emu from {emu.__file__}")
PY

section "bench/gpu_check.py $*"
rm -rf "$RUN/gpu_check"  # an earlier call's report and logs (a warm machine keeps its disk between calls)
"$PYTHON" bench/gpu_check.py --out "$RUN/gpu_check" --install-seconds "$install_seconds" "$@"
finish $?
