#!/usr/bin/env bash
# The GPU path in one bounded run, on a machine with an NVIDIA GPU, from the repository root:
#   (a) the README's `dvc repro` on the embedded default (device: auto must pick CUDA): each stage's
#       wall time and the headline metrics;
#   (b) benchmarks/train_throughput.py in bf16 for the small, medium, large and a 1B shape (tinyllama_1b,
#       32k vocabulary), eager and with --compile: tokens/s, MFU against the measured bf16 matmul,
#       the ratio to transformers, and (c) each model's peak GPU memory.
# Each part has its own timeout, so one failure does not eat the run; logs go to $OUT (default
# /tmp/gpu_check). A CPU dry run of the same steps (tiny shapes, few steps):
#   bash benchmarks/gpu_check.sh --dry-run
# On the lent GPU machine (no package registry) carry the missing packages as wheels in .whl/ (see
# benchmarks/README.md, "GPU"); the script installs them into /tmp/site first.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

DEVICE=cuda PRECISION=bf16 PRESETS="small medium large tinyllama_1b" TOKENS=16384 STEPS="--steps 5 --rounds 2"
REPRO_TIMEOUT=${REPRO_TIMEOUT:-200} EAGER_TIMEOUT=${EAGER_TIMEOUT:-100} COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-200}
if [[ "${1:-}" == "--dry-run" ]]; then
  DEVICE=cpu PRECISION=bf16 PRESETS="tiny small" TOKENS=1024 STEPS="--steps 1 --rounds 1"
fi

if ! PYTHONPATH=/tmp/site python3 -c "import dvc, mlflow, hydra, gguf, datasets, numba" 2>/dev/null; then
  if [[ -f .site/site.tar.xz ]]; then  # the wheels' contents in one archive (llvmlite alone is 60 MB as a wheel)
    echo "== unpacking the carried packages"
    mkdir -p /tmp/site && tar -xJf .site/site.tar.xz -C /tmp/site || { echo "unpacking failed"; exit 1; }
  elif [[ -d .whl ]]; then
    echo "== installing the carried wheels"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed"; exit 1; }
  fi
fi
if [[ -d /tmp/site ]]; then
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  # dvc.yaml calls `python`: a wrapper, not a link (a link to a venv's python3 loses the venv's packages)
  mkdir -p /tmp/site/bin && printf '#!/bin/sh\nexec "%s" "$@"\n' "$(command -v python3)" > /tmp/site/bin/python
  command -v dvc >/dev/null || printf '#!/bin/sh\nexec "%s" -m dvc "$@"\n' "$(command -v python3)" > /tmp/site/bin/dvc
  chmod +x /tmp/site/bin/*
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
if ! command -v git >/dev/null; then
  dvc config --local core.no_scm true
elif [[ ! -d .git || -f .git/gpu-check ]]; then  # DVC needs a git repository; ours follows the copied tree
  [[ -d .git ]] || { git init -q && printf '/.whl/\n/.site/\n' >> .git/info/exclude && touch .git/gpu-check; }
  git add -A && git -c user.name=gpu-check -c user.email=gpu@example.com commit -qm "gpu check" --allow-empty
fi
python3 - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)})" if torch.cuda.is_available() else "")
PY

# bounded SECONDS LOG COMMAND...: run COMMAND in its own process group, killed whole at the timeout (a plain
# `timeout` kills the command but not, say, the stage dvc runs, which keeps an output pipe open), each line
# timestamped into LOG and shown.
BOUNDED='import os, signal, subprocess, sys, threading, time
start = time.time()
process = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
timer = threading.Timer(float(sys.argv[1]), lambda: os.killpg(process.pid, signal.SIGKILL))
timer.start()
for line in process.stdout:
    print(f"{time.time() - start:8.1f} {line}", end="", flush=True)
timer.cancel()
command = " ".join(sys.argv[2:])
print(f"{time.time() - start:8.1f} exit status {process.wait()}: {command}", flush=True)'
bounded() { local seconds=$1 log=$2; shift 2; python3 -c "$BOUNDED" "$seconds" "$@" | tee "$log"; }

PARTS=${PARTS:-aec}  # a: dvc repro, e: throughput eager, c: throughput compiled (PARTS=a: dvc repro only)
if [[ "$PARTS" == *a* ]]; then
echo "== (a) dvc repro (timeout ${REPRO_TIMEOUT} s)"
bounded "$REPRO_TIMEOUT" "$OUT/repro.log" dvc repro > /dev/null
tail -1 "$OUT/repro.log"
grep -E "Running stage|on cuda|on cpu|precision|held_out|error" "$OUT/repro.log" | head -40
awk '/Running stage/ {if (name) printf "  %-16s %6.1f s\n", name, $1 - t; name = $4; t = $1} END {if (name) printf "  %-16s %6.1f s (to the end of dvc repro)\n", name, $1 - t}' "$OUT/repro.log"
grep -q "exit status 0:" "$OUT/repro.log" && python3 -c 'import json, pathlib
for path in ["reports/pretrain/metrics.json", "reports/finetune/metrics.json", "reports/evaluate/metrics.json"]:
    if pathlib.Path(path).exists():
        print(" ", path, json.dumps(json.loads(pathlib.Path(path).read_text())))' | tee "$OUT/metrics.txt"

fi
if [[ "$PARTS" == *e* ]]; then
echo "== (b, c) throughput, eager (timeout ${EAGER_TIMEOUT} s)"
bounded "$EAGER_TIMEOUT" "$OUT/throughput_eager.log" python3 benchmarks/train_throughput.py --device "$DEVICE" \
  --precision "$PRECISION" --preset $PRESETS --tokens-per-step "$TOKENS" $STEPS | grep -v Warning
fi
if [[ "$PARTS" == *c* ]]; then
echo "== (b, c) throughput, compiled (timeout ${COMPILE_TIMEOUT} s)"
bounded "$COMPILE_TIMEOUT" "$OUT/throughput_compiled.log" python3 benchmarks/train_throughput.py --device "$DEVICE" \
  --precision "$PRECISION" --preset $PRESETS --tokens-per-step "$TOKENS" $STEPS --compile | grep -v Warning
fi
if [[ "$PARTS" == *s* ]]; then  # the 1B recipe of benchmarks/scale.py (issue 24), fine-tuning on the GPU
echo "== (s) benchmarks/scale.py --lora-only on $DEVICE (timeout ${SCALE_TIMEOUT:-450} s)"
bounded "${SCALE_TIMEOUT:-450}" "$OUT/scale.log" python3 benchmarks/scale.py --lora-only --workdir /tmp \
  --set "finetune.device=$DEVICE" "finetune.precision=auto"
fi
echo "== done"
