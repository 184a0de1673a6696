from os import PathLike
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

__version__: str
_Path = Union[str, PathLike]

class PipelineError(Exception): ...

class RustBuffer:
    """The memory of a view array (its `base`), handed back to the pipeline for reuse when freed."""

class Batches(Iterator[Dict[str, Any]]):
    digest: Optional[str]
    epoch: int
    def __iter__(self) -> "Batches": ...
    def __next__(self) -> Dict[str, Any]: ...
    def close(self) -> None: ...

class Pipeline:
    epoch: int
    samples: int
    threads: int
    rank: int
    world_size: int
    name: str
    seed: int
    stages: List[str]
    def __init__(
        self,
        path: _Path,
        overrides: Optional[Dict[str, Any]] = None,
        threads: Optional[int] = None,
        seed: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Batches: ...
    def iter_with_digest(self) -> Batches: ...
    def set_epoch(self, epoch: int) -> None: ...

def validate(path: _Path, overrides: Optional[Dict[str, Any]] = None) -> None: ...
def kinds() -> List[Tuple[str, str, str]]: ...
def run(
    path: _Path,
    overrides: Optional[Dict[str, Any]] = None,
    out: Optional[_Path] = None,
    threads: Optional[int] = None,
    seed: Optional[int] = None,
) -> Dict[str, Any]: ...
