"""`TorchDataset`: a `Pipeline` as a `torch.utils.data.IterableDataset`."""

import torch

from ._native import Pipeline


class TorchDataset(torch.utils.data.IterableDataset):
    """Batches of a pipeline as torch tensors that share the pipeline's buffers (no copy).

    The pipeline batches and runs its own worker threads, so give it to a `DataLoader` with
    `batch_size=None` and `num_workers=0`, or iterate it directly. Under
    DistributedDataParallel pass `rank` and `world_size` (each rank reads a disjoint shard)
    and call `set_epoch` before each epoch, as with `DistributedSampler`.

    Arguments are `Pipeline`'s: `TorchDataset(path, overrides=None, threads=None, seed=None,
    rank=0, world_size=1)`, or `TorchDataset(pipeline=Pipeline(...))`.
    """

    def __init__(self, path=None, overrides=None, threads=None, seed=None, rank=0, world_size=1, *, pipeline=None):
        super().__init__()
        if (path is None) == (pipeline is None):
            raise TypeError("give either a pipeline file path or pipeline=Pipeline(...)")
        self.pipeline = pipeline if pipeline is not None else Pipeline(
            path, overrides=overrides, threads=threads, seed=seed, rank=rank, world_size=world_size
        )

    def set_epoch(self, epoch):
        self.pipeline.set_epoch(epoch)

    def __len__(self):
        return len(self.pipeline)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError(
                "TorchDataset runs its own worker threads; use DataLoader(..., batch_size=None, num_workers=0)"
            )
        for batch in self.pipeline:
            out = {"views": [torch.from_numpy(v) for v in batch["views"]], "index": torch.from_numpy(batch["index"])}
            if "label" in batch:
                out["label"] = torch.from_numpy(batch["label"])
            yield out
