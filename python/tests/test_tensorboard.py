"""A run's `tb/` event files, read back by TensorBoard's own reader (skipped without the
`tensorboard` package; `.ci/run` installs it)."""

import pytest

import simclr_pipeline as sp
from test_run import RUN

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def load(path):
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def test_a_run_writes_training_curves_and_results_tensorboard_reads(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(RUN)
    out = tmp_path / "rundir"
    results = sp.run(f, overrides={"train.epochs": 3, "train.monitor": {"train_data": "eval_train", "test_data": "eval_test", "every": 1}}, out=out, threads=2)
    acc = load(out / "tb")
    tags = set(acc.Tags()["scalars"])
    for want in ["train/loss", "train/lr", "train/contrast_acc", "train/images_per_s", "train/data_wait_s",
                 "train_epoch/loss", "monitor/knn_top1", "results/simclr/linear_top1"]:
        assert want in tags, (want, sorted(tags))
    loss = acc.Scalars("train/loss")
    # 3 epochs of 2 steps, in step order, the values metrics.jsonl holds (as float32).
    assert [e.step for e in loss] == [0, 1, 2, 3, 4, 5]
    assert all(0.0 < e.value < 10.0 for e in loss)
    knn = acc.Scalars("monitor/knn_top1")
    assert len(knn) == 3
    final = acc.Scalars("results/simclr/linear_top1")
    assert final[0].value == pytest.approx(results["simclr"]["linear_top1"], rel=1e-6)
