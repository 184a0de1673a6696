#!/usr/bin/env python3
"""PyTorch's side of scripts/gpu-check.sh: the same SimCLR training step as
`simclr bench pipelines/bench/gpu-*.yaml`, timed the way ../shared/bench/anchors/train_bench.py
times it (fixed input batch, warm-up steps, median of timed steps, FLOPs of one extra step from
torch's FlopCounterMode), on a GPU with TF32 allowed for matmuls and convolutions (as CubeCL
computes f32 matmuls).

Models (torchvision, weights=None, fc = Identity):
  resnet18-cifar  conv1 3x3/s1/p1 without bias, maxpool = Identity; head Linear(512,512)-ReLU-
                  Linear(512,128); NT-Xent t = 0.5; 32x32 inputs
  resnet50        the ImageNet stem; head Linear(2048,2048)-ReLU-Linear(2048,128); NT-Xent
                  t = 0.1; 224x224 inputs
Both: SGD momentum 0.9, lr 0.3 x N/256, weight decay 1e-4; both views in one batch of 2N.
Prints one JSON object.

    python3 scripts/gpu_torch_step.py --model resnet18-cifar --pairs 512 [--device cuda]
"""
import argparse
import json
import statistics
import sys
import time


def build(model: str):
    import torch.nn as nn
    import torchvision

    if model == "resnet18-cifar":
        enc = torchvision.models.resnet18(weights=None)
        enc.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        enc.maxpool = nn.Identity()
        dim, side, temperature = 512, 32, 0.5
    elif model == "resnet50":
        enc = torchvision.models.resnet50(weights=None)
        dim, side, temperature = 2048, 224, 0.1
    else:
        raise SystemExit(f"unknown model {model}: resnet18-cifar | resnet50")
    enc.fc = nn.Identity()
    head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 128))
    return nn.Sequential(enc, head), side, temperature


def nt_xent(z, n: int, temperature: float):
    import torch
    import torch.nn.functional as F

    z = F.normalize(z, dim=1)
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18-cifar")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-tf32", action="store_true", help="strict f32 matmuls and convolutions")
    a = ap.parse_args()
    import torch

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_torch_step.py: torch.cuda.is_available() is False", file=sys.stderr)
        return 3
    tf32 = not a.no_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model, side, temperature = build(a.model)
    model = model.to(dev).train()
    n = a.pairs
    x = torch.randn(2 * n, 3, side, side, device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.3 * n / 256, momentum=0.9, weight_decay=1e-4)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        loss = nt_xent(model(x), n, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    times, losses = [], []
    for k in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        loss = float(step().detach())  # reads the loss back: the step is finished
        sync()
        dt = time.perf_counter() - t0
        losses.append(round(loss, 5))
        if k >= a.warmup:
            times.append(dt)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    sync()
    flops = fc.get_total_flops()
    med = statistics.median(times)
    print(json.dumps({
        "model": a.model,
        "pairs": n,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tf32": tf32,
        "step_s_median": med,
        "step_s": times,
        "images_per_s": 2 * n / med,
        "gflop_per_step": flops / 1e9,
        "tflops": flops / med / 1e12,
        "losses": losses,
        "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
