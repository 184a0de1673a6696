#!/usr/bin/env python3
"""Loads the encoder.safetensors written by `examples/torchvision_check.rs` into torchvision's
resnet18 (CIFAR stem: conv1 3x3 stride 1, maxpool and fc = Identity) with strict=True, and checks
that its eval-mode output on the same inputs matches the Rust encoder's h.

usage: python torchvision_check.py OUT_DIR   (needs torch, torchvision, safetensors or numpy)
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision


def load_safetensors(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        a, b = v["data_offsets"]
        dtype = {"F32": np.float32, "I64": np.int64}[v["dtype"]]
        out[name] = torch.from_numpy(np.frombuffer(data[a:b], dtype=dtype).reshape(v["shape"]).copy())
    return out, header.get("__metadata__", {})


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "torchvision-check")
    sd, meta = load_safetensors(out / "encoder.safetensors")
    print("metadata:", meta)
    enc = torchvision.models.resnet18(weights=None)
    enc.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    enc.maxpool = nn.Identity()
    enc.fc = nn.Identity()
    enc.load_state_dict(sd, strict=True)
    enc.eval()
    x = torch.from_numpy(np.fromfile(out / "input.f32", dtype=np.float32)).reshape(4, 3, 32, 32)
    h_rust = torch.from_numpy(np.fromfile(out / "h.f32", dtype=np.float32)).reshape(4, -1)
    with torch.no_grad():
        h = enc(x)
    err = (h - h_rust).abs().max().item()
    scale = h.abs().max().item()
    print(f"{len(sd)} tensors loaded strictly; max |h_torch - h_rust| = {err:.3e} (max |h| = {scale:.3e})")
    if err > 1e-4 * max(scale, 1.0):
        sys.exit("MISMATCH")
    print("OK")


if __name__ == "__main__":
    main()
