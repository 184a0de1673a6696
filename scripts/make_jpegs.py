#!/usr/bin/env python3
"""Writes COUNT synthetic JPEG photos-alike (smooth colour fields, edges and noise, 500x375 and
other ImageNet-like sizes, quality 90) into DIR, deterministically, for scripts/gpu-check.sh's
"JPEG pipeline feeding the GPU" part. Needs numpy and Pillow; no network.

    python3 scripts/make_jpegs.py DIR [--count 1024] [--seed 0]
"""
import argparse
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--count", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    try:
        import numpy as np
        from PIL import Image
    except ImportError as e:
        print(f"make_jpegs.py: needs numpy and Pillow ({e})", file=sys.stderr)
        return 3
    os.makedirs(a.dir, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    sizes = [(500, 375), (375, 500), (500, 333), (640, 480), (400, 400)]
    for i in range(a.count):
        w, h = sizes[i % len(sizes)]
        # A coarse random field upsampled (smooth regions), a few hard edges, fine noise.
        coarse = rng.integers(0, 256, size=(h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16)
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] += rng.integers(-80, 80, size=3, dtype=np.int16)
        arr += rng.integers(-12, 13, size=arr.shape, dtype=np.int16)
        out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        out.save(os.path.join(a.dir, f"img_{i:05d}.jpg"), quality=90)
    print(f"make_jpegs.py: {a.count} JPEGs in {a.dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
