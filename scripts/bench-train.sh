#!/usr/bin/env bash
# Side-by-side training-step benchmark: PyTorch (../shared/bench/anchors/train_bench.py) and
# `simclr bench --train-steps`, interleaved, ResNet-18 CIFAR stem, 128 pairs, 2 threads.
#   scripts/bench-train.sh [DATA] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-$HOME/.cache/simclr-anchor-data}
ROUNDS=${2:-1}
PY=${SIMCLR_ANCHOR_PY:-$HOME/.cache/simclr-anchor-venv/bin/python}
ANCHORS=${SIMCLR_ANCHORS:-../shared/bench/anchors}
BIN=${SIMCLR_BIN:-target/release/simclr}
[ -n "${SIMCLR_BIN:-}" ] || cargo build --release --quiet
mkdir -p bench-out
for r in $(seq 1 "$ROUNDS"); do
  "$PY" "$ANCHORS/train_bench.py" --data "$DATA" --batch-pairs 128 --steps 10 --warmup 3 --threads 2 \
    --no-flops --max-wait 0 --max-attempts 1 --json-out "bench-out/train-py-$r.json" > /dev/null 2>&1
  "$BIN" bench pipelines/bench/train-resnet18-cifar.yaml --set "data.path=$DATA/cifar" --threads 2 \
    --samples 256 --train-steps 10 --json > "bench-out/train-rs-$r.json"
done
python3 - "$ROUNDS" <<'PYEOF'
import json, sys
for r in range(1, int(sys.argv[1]) + 1):
    py = json.load(open(f"bench-out/train-py-{r}.json"))["results"]["batch128pairs"]
    rs = json.load(open(f"bench-out/train-rs-{r}.json"))["train"]
    print(f"round {r}: pytorch {py['median_s_per_step']:.3f} s/step ({py['images_per_s']:.1f} images/s); "
          f"simclr {rs['step_s_median']:.3f} s/step ({rs['images_per_s']:.1f} images/s, data wait {100*rs['data_wait_frac']:.2f}%); "
          f"ratio {rs['images_per_s']/py['images_per_s']:.2f}x")
PYEOF
