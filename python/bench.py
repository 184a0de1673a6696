#!/usr/bin/env python3
"""Side by side: images/s of the ImageNet SimCLR recipe through `simclr_pipeline.Pipeline`, the
`simclr bench` CLI, and torchvision / albumentations through a PyTorch DataLoader.

    python python/bench.py [--data DATA] [--rounds 3] [--threads 2]

DATA is the folder made by ../shared/bench/anchors/make_images.py (default
~/.cache/simclr-anchor-data; its jpeg/ folder is read). Run it with the Python that has
simclr_pipeline installed. The anchors (aug_bench.py's `imagenet_tv_loader2w` and
`imagenet_alb_loader2w`) run in their own venv ($SIMCLR_ANCHOR_PY, default
~/.cache/simclr-anchor-venv/bin/python) and the CLI is $SIMCLR_BIN (default
target/release/simclr). Cases are interleaved round by round (the machine is shared and
noisy); the table gives per-round numbers, medians and ratios. --json-out writes them all.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import simclr_pipeline as sp

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "pipelines" / "bench" / "imagenet-aug.yaml"


def python_rate(data, threads, min_seconds):
    """Images/s through the Python iterator: a warm-up epoch, then whole epochs >= min_seconds."""
    pipe = sp.Pipeline(PIPELINE, overrides={"data.path": str(data / "jpeg")}, threads=threads)
    t = time.perf_counter()
    for _ in pipe:  # warm-up: file cache, allocator, threads (as `simclr bench` and the anchors)
        pass
    warm = time.perf_counter() - t
    epochs = max(1, int(-(-min_seconds // max(warm, 1e-3))))
    images = 0
    t = time.perf_counter()
    for e in range(epochs):
        pipe.set_epoch(e + 1)
        for batch in pipe:
            images += batch["index"].shape[0]
    return images / (time.perf_counter() - t)


def cli_rate(binary, data, threads, min_seconds):
    out = subprocess.run(
        [binary, "bench", str(PIPELINE), "--set", f"data.path={data / 'jpeg'}", "--threads", str(threads),
         "--min-seconds", str(min_seconds), "--json"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)["samples_per_s"]


def anchor_rates(anchor_py, anchors, data, extra):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aug.json"
        subprocess.run(
            [anchor_py, str(anchors / "aug_bench.py"), "--data", str(data), "--cases",
             "imagenet_tv_loader2w,imagenet_alb_loader2w", "--repeats", "1", "--json-out", str(out), *extra],
            check=True, stdout=subprocess.DEVNULL,
        )
        res = json.loads(out.read_text())["results"]
    return {k: v["images_per_s"] for k, v in res.items() if v.get("images_per_s")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path.home() / ".cache" / "simclr-anchor-data")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=4.0)
    ap.add_argument("--anchor-args", default="--max-wait 60 --max-attempts 1",
                    help="extra arguments for aug_bench.py (its load protocol)")
    ap.add_argument("--skip-anchors", action="store_true")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    binary = os.environ.get("SIMCLR_BIN", str(ROOT / "target" / "release" / "simclr"))
    anchor_py = os.environ.get("SIMCLR_ANCHOR_PY", str(Path.home() / ".cache" / "simclr-anchor-venv" / "bin" / "python"))
    anchors = Path(os.environ.get("SIMCLR_ANCHORS", ROOT.parent / "shared" / "bench" / "anchors"))

    runs = {}
    for r in range(1, args.rounds + 1):
        print(f"round {r}/{args.rounds}", file=sys.stderr)
        if not args.skip_anchors:
            for k, v in anchor_rates(anchor_py, anchors, args.data, args.anchor_args.split()).items():
                runs.setdefault(k, []).append(v)
        runs.setdefault("simclr_pipeline", []).append(python_rate(args.data, args.threads, args.min_seconds))
        runs.setdefault("simclr_cli", []).append(cli_rate(binary, args.data, args.threads, args.min_seconds))

    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"| case ({args.threads} threads / workers) | " + " | ".join(f"round {i}" for i in range(1, args.rounds + 1)) + " | median |")
    print("| --- |" + " ---: |" * (args.rounds + 1))
    for k, v in runs.items():
        print(f"| {k} | " + " | ".join(f"{x:,.1f}" for x in v) + f" | **{med[k]:,.1f}** |")
    print()
    print("| ratio (medians) | value | per round |")
    print("| --- | ---: | --- |")
    ratios = {}
    for name, a, b in [
        ("simclr_pipeline vs torchvision DataLoader", "simclr_pipeline", "imagenet_tv_loader2w"),
        ("simclr_pipeline vs albumentations DataLoader", "simclr_pipeline", "imagenet_alb_loader2w"),
        ("simclr_pipeline vs simclr bench (CLI)", "simclr_pipeline", "simclr_cli"),
    ]:
        if a in med and b in med:
            ratios[name] = med[a] / med[b]
            per = ", ".join(f"{x / y:.2f}x" for x, y in zip(runs[a], runs[b]))
            print(f"| {name} | {ratios[name]:.2f}x | {per} |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"threads": args.threads, "runs": runs, "median": med, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
