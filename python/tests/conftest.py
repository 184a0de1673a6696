"""Small pipeline files the tests write for themselves (the generated shapes: no data set)."""

import os
import shutil

import pytest

# Two views of 16-px generated images through crop, flip and colour distortion, in batches.
DATA = """\
name: pytest-data
seed: 7
stages:
  - {{ id: data, kind: synthetic_shapes, count: {count}, size: 16, classes: 3, shuffle: true }}
  - {{ id: views, kind: views, count: 2 }}
  - {{ id: crop, kind: random_resized_crop, size: 12 }}
  - {{ id: flip, kind: horizontal_flip }}
  - {{ id: color, kind: color_distort, strength: 0.5 }}
  - {{ id: tensor, kind: to_tensor }}
  - {{ id: batch, kind: batch, batch_size: {batch}, drop_last: {drop_last} }}
  - {{ id: train, kind: simclr_train, width: 0.0625, epochs: 1, warmup_epochs: 0, checkpoint_every: 0 }}
"""


@pytest.fixture
def data_file(tmp_path):
    """Writes the data pipeline (60 images, batches of 8, last partial batch kept) and returns its path."""

    def make(count=60, batch=8, drop_last="false", name="data.yaml"):
        path = tmp_path / name
        path.write_text(DATA.format(count=count, batch=batch, drop_last=drop_last))
        return path

    return make


def simclr_binary():
    """The `simclr` CLI to compare against: $SIMCLR_BIN, else one on PATH, else None."""
    exe = os.environ.get("SIMCLR_BIN") or shutil.which("simclr")
    return exe if exe and os.path.exists(exe) else None
