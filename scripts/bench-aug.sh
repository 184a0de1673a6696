#!/usr/bin/env bash
# Side-by-side augmentation benchmark: the Python anchors (torchvision, albumentations) and
# `simclr bench`, interleaved (Python, Rust, Python, Rust) on the same data, then ratios.
#
#   scripts/bench-aug.sh [DATA] [ROUNDS]
#
# DATA is the folder made by ../shared/bench/anchors/make_images.py (default
# ~/.cache/simclr-anchor-data); the anchor venv is ~/.cache/simclr-anchor-venv (see
# ../shared/bench/README.md). SIMCLR_BIN picks a prebuilt binary. Writes bench-out/aug-*.json
# and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-$HOME/.cache/simclr-anchor-data}
ROUNDS=${2:-2}
PY=${SIMCLR_ANCHOR_PY:-$HOME/.cache/simclr-anchor-venv/bin/python}
ANCHORS=${SIMCLR_ANCHORS:-../shared/bench/anchors}
OUT=bench-out
mkdir -p "$OUT"
if [ -z "${SIMCLR_BIN:-}" ]; then
  cargo build --release --quiet
fi
BIN=${SIMCLR_BIN:-target/release/simclr}
CASES=imagenet_tv_1thread,imagenet_tvsep_1thread,imagenet_alb_1thread,imagenet_alb_loader2w,cifar_tv_1thread,cifar_alb_1thread,cifar_alb_loader2w
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r: python anchors" >&2
  # SIMCLR_PY_ARGS="--max-wait 0 --max-attempts 1" measures at once on a busy machine.
  # shellcheck disable=SC2086
  "$PY" "$ANCHORS/aug_bench.py" --data "$DATA" --cases "$CASES" --repeats 1 ${SIMCLR_PY_ARGS:---max-wait 120} \
    --json-out "$OUT/aug-py-$r.json" > /dev/null
  echo "round $r: simclr" >&2
  for t in 1 2; do
    "$BIN" bench pipelines/bench/imagenet-aug.yaml --set "data.path=$DATA/jpeg" --threads $t --json > "$OUT/aug-rs-imagenet-$t-$r.json"
    "$BIN" bench pipelines/bench/cifar-aug.yaml --set "data.path=$DATA/cifar" --threads $t --json > "$OUT/aug-rs-cifar-$t-$r.json"
  done
done
python3 - "$OUT" "$ROUNDS" <<'PYEOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def med(xs): return statistics.median(xs)
py = {}
for r in range(1, rounds + 1):
    d = json.load(open(f"{out}/aug-py-{r}.json"))
    for name, res in d["results"].items():
        v = res.get("images_per_s")
        if v is not None:
            py.setdefault(name, []).append(v)
rs = {}
for kind in ("imagenet", "cifar"):
    for t in (1, 2):
        rs[(kind, t)] = med([json.load(open(f"{out}/aug-rs-{kind}-{t}-{r}.json"))["samples_per_s"] for r in range(1, rounds + 1)])
print("| case | images/s (median of %d) |" % rounds)
print("| --- | ---: |")
for k, v in sorted(py.items()):
    print(f"| python {k} | {med(v):.1f} |")
for (kind, t), v in rs.items():
    print(f"| simclr {kind} {t} thread{'s' if t > 1 else ''} | {v:.1f} |")
print()
def ratio(a, b): return f"{a / b:.2f}x"
pyv = {k: med(v) for k, v in py.items()}
rows = [
    ("imagenet 1 thread vs torchvision (stock blur)", rs[("imagenet", 1)], pyv.get("imagenet_tv_1thread")),
    ("imagenet 1 thread vs torchvision (separable blur)", rs[("imagenet", 1)], pyv.get("imagenet_tvsep_1thread")),
    ("imagenet 1 thread vs albumentations", rs[("imagenet", 1)], pyv.get("imagenet_alb_1thread")),
    ("imagenet 2 threads vs albumentations 2 workers", rs[("imagenet", 2)], pyv.get("imagenet_alb_loader2w")),
    ("cifar 1 thread vs torchvision", rs[("cifar", 1)], pyv.get("cifar_tv_1thread")),
    ("cifar 1 thread vs albumentations", rs[("cifar", 1)], pyv.get("cifar_alb_1thread")),
    ("cifar 2 threads vs albumentations 2 workers", rs[("cifar", 2)], pyv.get("cifar_alb_loader2w")),
    ("imagenet 2 threads vs 1 thread", rs[("imagenet", 2)], rs[("imagenet", 1)]),
    ("cifar 2 threads vs 1 thread", rs[("cifar", 2)], rs[("cifar", 1)]),
]
print("| ratio | value |")
print("| --- | ---: |")
for name, a, b in rows:
    if a and b:
        print(f"| {name} | {ratio(a, b)} |")
PYEOF
