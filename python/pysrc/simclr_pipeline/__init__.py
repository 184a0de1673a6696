"""The simclr data pipeline (SimCLR augmentations, parallel and deterministic) for Python.

    import simclr_pipeline as sp
    pipe = sp.Pipeline("pipelines/cifar10.yaml", overrides={"data.path": "data/cifar"}, threads=8)
    for epoch in range(10):
        pipe.set_epoch(epoch)
        for batch in pipe:                       # one dict per batch
            x1, x2 = batch["views"]              # float32 (B, C, H, W) NumPy arrays, no copy
            ...

`TorchDataset` wraps a pipeline as a `torch.utils.data.IterableDataset` (torch is imported
only when it is used). Errors in the file or in a stage raise `PipelineError`, whose message
is the CLI's FILE:LINE:COL text.
"""

from ._native import Batches, Pipeline, PipelineError, RustBuffer, __version__, kinds, run, validate

__all__ = ["Batches", "Pipeline", "PipelineError", "RustBuffer", "TorchDataset", "__version__", "kinds", "run", "validate"]


def __getattr__(name):
    # The PyTorch adapter imports torch, which is not a dependency: load it on first use.
    if name == "TorchDataset":
        from ._torch import TorchDataset

        return TorchDataset
    raise AttributeError(f"module 'simclr_pipeline' has no attribute {name!r}")
