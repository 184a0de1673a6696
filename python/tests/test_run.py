"""`simclr_pipeline.run`: the whole pipeline, training and evaluation included."""

import json

import pytest

import simclr_pipeline as sp

RUN = """\
name: pytest-run
seed: 3
stages:
  - { id: data, kind: synthetic_shapes, count: 32, size: 16, classes: 3, shuffle: true }
  - { id: views, kind: views, count: 2 }
  - { id: crop, kind: random_resized_crop, size: 16 }
  - { id: tensor, kind: to_tensor }
  - { id: batch, kind: batch, batch_size: 16 }
  - { id: train, kind: simclr_train, width: 0.0625, epochs: 1, warmup_epochs: 0, checkpoint_every: 0 }
  - { id: eval_train, kind: synthetic_shapes, count: 24, size: 16, classes: 3, split: train }
  - { id: eval_test, kind: synthetic_shapes, count: 24, size: 16, classes: 3, split: test }
  - { id: probe, kind: linear_eval, encoders: [train], train_data: eval_train, test_data: eval_test, k: 3 }
"""


def test_run_trains_evaluates_and_returns_the_results(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(RUN)
    out = tmp_path / "rundir"
    results = sp.run(f, overrides={"train.epochs": 2}, out=out, threads=2)
    assert results == json.loads((out / "results.json").read_text())
    assert (out / "pipeline.yaml").is_file() and (out / "encoder.safetensors").is_file()
    probe = next(e for e in results["evals"] if e["stage"] == "probe")
    assert 0.0 <= probe["metrics"]["linear_top1"] <= 100.0, probe
    assert results["simclr"]["linear_top1"] == probe["metrics"]["linear_top1"]
    # Two epochs of 2 batches of 16 pairs.
    train_chain = results["chains"][0]
    assert train_chain["samples"] == 64
    assert results["run_dir"] == str(out)


def test_run_reports_invalid_files(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(RUN.replace("linear_eval", "linear_evl"))
    with pytest.raises(sp.PipelineError, match=r"run.yaml:\d+:\d+: stage 'probe'"):
        sp.run(f, out=tmp_path / "never")
