"""The PyTorch adapter (skipped when torch is not installed: it is not a dependency)."""

import pytest

import simclr_pipeline as sp

torch = pytest.importorskip("torch")


def test_torch_dataset_shares_the_buffers_and_feeds_a_dataloader(data_file):
    ds = sp.TorchDataset(data_file(), threads=2)
    assert len(ds) == 8
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
    batches = list(loader)
    assert len(batches) == 8
    x1, x2 = batches[0]["views"]
    assert x1.dtype == torch.float32 and x1.shape == (8, 3, 12, 12)
    assert batches[0]["label"].dtype == torch.int64
    # Same arrays as the NumPy iteration.
    first = next(iter(sp.Pipeline(data_file(), threads=1)))
    assert torch.equal(x2, torch.from_numpy(first["views"][1]))


def test_torch_dataset_epochs_and_shards(data_file):
    f = data_file()
    a = sp.TorchDataset(f, rank=0, world_size=2)
    b = sp.TorchDataset(pipeline=sp.Pipeline(f, rank=1, world_size=2))
    ia = torch.cat([x["index"] for x in a])
    ib = torch.cat([x["index"] for x in b])
    assert len(set(ia.tolist()) & set(ib.tolist())) == 0 and len(ia) + len(ib) == 60
    a.set_epoch(1)
    assert not torch.equal(torch.cat([x["index"] for x in a]), ia)
    with pytest.raises(TypeError):
        sp.TorchDataset()


def test_the_readme_training_loop_runs():
    pytest.importorskip("torchvision")
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    example = root / "python" / "examples" / "train_torch.py"
    # The README shows this file; keep them the same.
    assert example.read_text().strip() in (root / "README.md").read_text()
    out = subprocess.run([sys.executable, str(example)], cwd=root, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    losses = [float(line.split("loss")[1]) for line in out.stdout.splitlines() if "loss" in line]
    assert len(losses) == 2 and all(0.0 < x < 10.0 for x in losses), out.stdout
