#!/usr/bin/env bash
# One run on a machine with an NVIDIA GPU, no Rust toolchain and no network needed: checks the
# CUDA path against the CPU and measures training on it, beside PyTorch when `torch` imports.
#
#   scripts/gpu-check.sh [BINARY]        (default: target/release/simclr)
#
# BINARY is built elsewhere and carried over (train/README.md, "Devices and GPUs"):
#   CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda && strip target/release/simclr
# Parts (each under its own time limit; a failing part is recorded and the others still run):
#   1. simclr selftest --device cuda --json: a few SimCLR steps on the GPU and on the CPU from the
#      same weights and batches; gradients, weights and losses compared (TF32 tolerance)
#   2. ResNet-18 CIFAR, 512 pairs (pipelines/bench/gpu-resnet18-cifar.yaml) and ResNet-50 224x224,
#      64 pairs (gpu-resnet50.yaml): steps fed by the pipeline; images/s, TFLOP/s, share of peak
#   3. the same steps in PyTorch (scripts/gpu_torch_step.py, TF32 on), when torch imports
#   4. the whole ImageNet recipe on all cores from synthetic JPEGs (scripts/make_jpegs.py, numpy +
#      Pillow) feeding ResNet-50 on the GPU: data_wait_frac
# Output: $OUT (default gpu-check-out/): gpu-check.json (everything), gpu-check.md (the table,
# also printed), logs/. At most GPU_CHECK_BUDGET_S (450 s) in all; kernel compilation and
# autotuning take most of the first steps.
#
# Environment: GPU_CHECK_DEVICE (default cuda; `cpu` with GPU_CHECK_QUICK=1 is the dry run that
# exercises every part on a CPU with small batches), GPU_PEAK_TFLOPS (dense TF32 peak, when the
# GPU is not in the table below), PYTHON (default python3), STEPS (timed steps, default 10).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/simclr}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
OUT=${OUT:-gpu-check-out}
PY=${PYTHON:-python3}
STEPS=${STEPS:-10}
THREADS=$(nproc)
mkdir -p "$OUT/logs"
LOG="$OUT/logs"
[ -x "$BIN" ] || { echo "gpu-check: no simclr binary at $BIN (build: CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda)" >&2; exit 2; }
START=$(date +%s)
say() { echo "[gpu-check $(( $(date +%s) - START ))s] $*" >&2; }

# Sizes: the issue's on a GPU; small ones for the CPU dry run.
if [ "$QUICK" = 1 ]; then
  R18=(--set batch.batch_size=16 --samples 64); R50=(--set batch.batch_size=4 --samples 16)
  JPEG=(--set batch.batch_size=4 --samples 32); TPAIRS18=16; TPAIRS50=4; STEPS=${GPU_CHECK_STEPS:-2}; NJPEG=64
else
  R18=(--samples 1024); R50=(--samples 256); JPEG=(--samples 512); TPAIRS18=512; TPAIRS50=64; NJPEG=1024
fi

# 0. The machine.
{
  echo "date: $(date -u +%FT%TZ)"
  echo "simclr: $("$BIN" --version 2>&1)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $THREADS"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
} > "$OUT/machine.txt" 2>&1
say "machine: $(tr '\n' ';' < "$OUT/machine.txt")"

# The whole run stays under GPU_CHECK_BUDGET_S (default 450 s): each part gets its own limit or
# what is left, whichever is less, and a part with under 10 s left is skipped (exit 124).
DEADLINE=$(( START + ${GPU_CHECK_BUDGET_S:-450} ))
part() { # NAME LIMIT_S OUTFILE -- command...
  local name=$1 limit=$2 out=$3; shift 4
  local left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    say "$name: skipped, the time budget is spent"; echo "124 0" > "$LOG/$name.rc"; return 124
  fi
  say "$name ..."
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out" 2> "$LOG/$name.log"
  local rc=$?
  echo "$rc $(( $(date +%s) - t0 ))" > "$LOG/$name.rc"
  say "$name: exit $rc in $(( $(date +%s) - t0 )) s$([ $rc = 124 ] && echo " (time limit ${limit} s)")"
  [ $rc = 0 ] || tail -n 5 "$LOG/$name.log" >&2
  return $rc
}

# 1. Correctness first: compiling and autotuning every kernel once is most of its time.
part selftest 150 "$OUT/selftest.json" -- \
  env CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}" "$BIN" selftest --device "$DEVICE" --steps 3 --json

# 2. Training steps fed by the pipeline, default autotuning (the first, untimed step tunes).
part simclr-resnet18 120 "$OUT/simclr-resnet18.json" -- "$BIN" bench pipelines/bench/gpu-resnet18-cifar.yaml \
  --set "train.device=$DEVICE" "${R18[@]}" --train-steps "$STEPS" --threads "$THREADS" --json
part simclr-resnet50 120 "$OUT/simclr-resnet50.json" -- "$BIN" bench pipelines/bench/gpu-resnet50.yaml \
  --set "train.device=$DEVICE" "${R50[@]}" --train-steps "$STEPS" --threads "$THREADS" --json

# 3. PyTorch, the same steps.
if "$PY" -c 'import torch, torchvision' 2>/dev/null; then
  part torch-resnet18 90 "$OUT/torch-resnet18.json" -- "$PY" scripts/gpu_torch_step.py --model resnet18-cifar \
    --pairs "$TPAIRS18" --device "$DEVICE" --steps "$STEPS"
  part torch-resnet50 90 "$OUT/torch-resnet50.json" -- "$PY" scripts/gpu_torch_step.py --model resnet50 \
    --pairs "$TPAIRS50" --device "$DEVICE" --steps "$STEPS"
else
  say "torch/torchvision do not import with $PY: PyTorch side skipped"
fi

# 4. JPEGs on every core feeding the GPU.
JDIR="$OUT/jpeg"
if [ -f "$JDIR/.done-$NJPEG" ] || { part make-jpegs 60 /dev/null -- "$PY" scripts/make_jpegs.py "$JDIR" --count "$NJPEG" && touch "$JDIR/.done-$NJPEG"; }; then
  part simclr-jpeg 120 "$OUT/simclr-jpeg.json" -- "$BIN" bench pipelines/bench/gpu-imagenet-jpeg.yaml \
    --set "data.path=$(cd "$JDIR" && pwd)" --set "train.device=$DEVICE" "${JPEG[@]}" --train-steps "$STEPS" \
    --threads "$THREADS" --json
fi

# 5. One JSON and the table.
"$PY" - "$OUT" "$DEVICE" "$(( $(date +%s) - START ))" <<'PYEOF'
import json, os, sys
out, device, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def load(name):
    p = os.path.join(out, name + ".json")
    try:
        text = open(p).read().strip()
    except OSError:
        return None
    for doc in (text, text.splitlines()[-1] if text else ""):  # one object, or JSON as the last line
        try:
            return json.loads(doc)
        except ValueError:
            pass
    return None
def status(name):
    try:
        rc, s = open(os.path.join(out, "logs", name + ".rc")).read().split()
        return {"exit": int(rc), "seconds": int(s)}
    except Exception:
        return None
machine = open(os.path.join(out, "machine.txt")).read()
gpu = next((l for l in machine.splitlines() if "," in l and not l.startswith(("date", "simclr", "cpu"))), "")
# Dense TF32 tensor-core peaks (TFLOP/s, vendor data sheets; f32 matmuls run in TF32 on both sides).
PEAKS = {"H200": 494.7, "H100 SXM": 494.7, "H100 80GB HBM3": 494.7, "H100 PCIe": 378.0, "H100 NVL": 417.5,
         "A100": 156.0, "L40S": 183.0, "L4": 60.0, "A10": 62.5, "RTX 4090": 82.6}
peak = float(os.environ["GPU_PEAK_TFLOPS"]) if os.environ.get("GPU_PEAK_TFLOPS") else next(
    (v for k, v in PEAKS.items() if k in gpu), None)
parts = ["selftest", "simclr-resnet18", "simclr-resnet50", "torch-resnet18", "torch-resnet50", "make-jpegs", "simclr-jpeg"]
r = {"device": device, "gpu": gpu, "machine": machine, "seconds": seconds, "peak_tf32_tflops": peak,
     "parts": {p: status(p) for p in parts}, "selftest": load("selftest")}
rows = []
for model, label in (("resnet18", "ResNet-18 CIFAR"), ("resnet50", "ResNet-50 224"), ("jpeg", "ResNet-50 224, JPEG pipeline")):
    ours = load("simclr-" + model)
    t = (ours or {}).get("train")
    torch = load("torch-" + model) if model != "jpeg" else None
    e = {"simclr": t, "pipeline_samples_per_s": (ours or {}).get("samples_per_s"), "torch": torch}
    if t:
        tflops = t["gflops"] / 1e3
        e["tflops"] = tflops
        e["peak_frac"] = tflops / peak if peak else None
        if torch:
            e["ratio_vs_torch"] = t["images_per_s"] / torch["images_per_s"]
    r[model] = e
    rows.append((label, t, torch, e))
with open(os.path.join(out, "gpu-check.json"), "w") as f:
    json.dump(r, f, indent=1)
st = r["selftest"]
lines = [f"# gpu-check: {gpu or device} ({seconds} s)", ""]
if st:
    lines.append(f"selftest --device {device}: {'ok' if st.get('ok') else 'MISMATCH'}, max_rel_diff "
                 f"{st.get('max_rel_diff', float('nan')):.2e} (tolerance {st.get('tolerance')}), {st.get('precision')}, "
                 f"{st.get('steps')} steps, {st.get('seconds', 0):.0f} s")
else:
    lines.append(f"selftest --device {device}: FAILED (see logs/selftest.log)")
lines += ["", "| step | pairs | simclr s/step | images/s | TFLOP/s | of peak | data wait | PyTorch s/step | images/s | TFLOP/s | simclr / PyTorch |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
f = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"
for label, t, torch, e in rows:
    if not t:
        lines.append(f"| {label} | - | failed or skipped | | | | | | | | |")
        continue
    lines.append("| " + " | ".join([label, str(t["pairs_per_batch"]), f(t["step_s_median"], ".4f"), f(t["images_per_s"], ".0f"),
        f(e["tflops"], ".2f"), f(e["peak_frac"], ".1%"), f(t["data_wait_frac"], ".1%"),
        f((torch or {}).get("step_s_median"), ".4f"), f((torch or {}).get("images_per_s"), ".0f"),
        f((torch or {}).get("tflops"), ".2f"), f(e.get("ratio_vs_torch"), ".2f") + ("x" if e.get("ratio_vs_torch") else "")]) + " |")
lines += ["", f"peak: dense TF32 {peak} TFLOP/s" if peak else "peak: unknown GPU (set GPU_PEAK_TFLOPS)",
          "parts: " + ", ".join(f"{p} {v['exit']} ({v['seconds']} s)" for p, v in r["parts"].items() if v)]
text = "\n".join(lines) + "\n"
open(os.path.join(out, "gpu-check.md"), "w").write(text)
print(text)
ok = st and st.get("ok") and all(v is None or v["exit"] == 0 for v in r["parts"].values())
sys.exit(0 if ok else 1)
PYEOF
