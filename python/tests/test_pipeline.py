"""`simclr_pipeline.Pipeline`: batches, zero copy, determinism, epochs, sharding, overrides."""

import hashlib
import json
import subprocess

import numpy as np
import pytest

import simclr_pipeline as sp
from conftest import simclr_binary


def fingerprint(pipe):
    """A hash of every array the pipeline yields, in order."""
    h = hashlib.sha256()
    for batch in pipe:
        for v in batch["views"]:
            h.update(v.tobytes())
        h.update(batch["index"].tobytes())
        h.update(batch["label"].tobytes())
    return h.hexdigest()


def test_batches_are_float32_views_with_labels_and_indices(data_file):
    pipe = sp.Pipeline(data_file(), threads=2)
    assert len(pipe) == 8  # 60 images in batches of 8, the last partial batch kept
    assert pipe.samples == 60
    assert pipe.stages == ["data", "views", "crop", "flip", "color", "tensor", "batch"]
    batches = list(pipe)
    assert len(batches) == len(pipe)
    sizes = [b["index"].shape[0] for b in batches]
    assert sizes == [8] * 7 + [4]
    for b in batches:
        n = b["index"].shape[0]
        assert len(b["views"]) == 2
        for v in b["views"]:
            assert v.dtype == np.float32 and v.shape == (n, 3, 12, 12)
            assert v.flags.c_contiguous and np.isfinite(v).all()
        assert b["label"].dtype == np.int64 and b["label"].shape == (n,)
        assert set(b["label"].tolist()) <= {0, 1, 2}
        assert b["index"].dtype == np.int64
        # Two different augmentations of the same images.
        assert not np.array_equal(b["views"][0], b["views"][1])
    # One epoch visits every image once (shuffled).
    seen = np.concatenate([b["index"] for b in batches])
    assert sorted(seen.tolist()) == list(range(60))
    assert seen.tolist() != list(range(60))


def test_arrays_own_the_rust_buffers_without_a_copy(data_file):
    batch = next(iter(sp.Pipeline(data_file(), threads=1)))
    v = batch["views"][0]
    # NumPy wraps the Rust allocation: the array does not own a NumPy buffer, its base is the
    # Rust buffer, and it stays valid (and writable) after the pipeline is gone.
    assert not v.flags.owndata and v.flags.writeable
    assert isinstance(v.base, sp.RustBuffer)
    v[0, 0, 0, 0] = 42.0
    assert v[0, 0, 0, 0] == 42.0


def test_arrays_kept_across_batches_stay_intact(data_file):
    # Buffers go back to the pool only once their arrays are gone: arrays kept from earlier
    # batches must not be overwritten by later ones.
    f = data_file(count=200, batch=8)
    kept = [(b["views"][0], b["views"][0].copy()) for b in sp.Pipeline(f, threads=2)]
    assert len(kept) == 25
    for arr, snapshot in kept:
        assert np.array_equal(arr, snapshot)
    # ...and with arrays dropped at once (buffers recycled), the data is the same.
    again = [b["views"][0].copy() for b in sp.Pipeline(f, threads=2)]
    for (_, snapshot), b in zip(kept, again):
        assert np.array_equal(snapshot, b)


def test_same_seed_same_arrays_for_any_thread_count(data_file):
    f = data_file()
    one = fingerprint(sp.Pipeline(f, threads=1))
    assert fingerprint(sp.Pipeline(f, threads=2)) == one
    assert fingerprint(sp.Pipeline(f, threads=3)) == one
    assert fingerprint(sp.Pipeline(f, threads=2, seed=7)) == one  # the file's own seed
    assert fingerprint(sp.Pipeline(f, threads=2, seed=8)) != one


def test_epochs_differ_and_repeat(data_file):
    pipe = sp.Pipeline(data_file(), threads=2)
    assert pipe.epoch == 0
    e0 = fingerprint(pipe)
    assert fingerprint(pipe) == e0  # iterating again repeats the epoch until set_epoch
    pipe.set_epoch(1)
    e1 = fingerprint(pipe)
    assert e1 != e0
    pipe.set_epoch(0)
    assert fingerprint(pipe) == e0


def test_consecutive_epochs_match_fresh_pipelines(data_file):
    # An epoch that ends leaves its run making the next epoch's batches; iterating that epoch
    # next takes them over. The arrays are those of a pipeline started at that epoch.
    f = data_file()
    pipe = sp.Pipeline(f, threads=2)
    carried = []
    for e in range(4):
        pipe.set_epoch(e)
        carried.append(fingerprint(pipe))
    fresh = []
    for e in range(4):
        p = sp.Pipeline(f, threads=1)
        p.set_epoch(e)
        fresh.append(fingerprint(p))
    assert carried == fresh and len(set(fresh)) == 4
    # Skipping an epoch, or going back, starts over at the asked epoch.
    pipe.set_epoch(2)
    assert fingerprint(pipe) == fresh[2]


def test_shards_are_disjoint_and_complete(data_file):
    f = data_file(count=61)
    full = sorted(np.concatenate([b["index"] for b in sp.Pipeline(f)]).tolist())
    shards = []
    for rank in range(3):
        pipe = sp.Pipeline(f, rank=rank, world_size=3, threads=1)
        idx = np.concatenate([b["index"] for b in pipe]).tolist()
        assert len(idx) == pipe.samples
        shards.append(set(idx))
    assert sum(len(s) for s in shards) == 61
    assert set().union(*shards) == set(full)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not shards[a] & shards[b]


def test_overrides_use_the_cli_set_keys(data_file):
    f = data_file()
    pipe = sp.Pipeline(f, overrides={"batch.batch_size": 10, "crop.size": 8, "color": "off"})
    assert len(pipe) == 6
    assert "color" not in pipe.stages
    b = next(iter(pipe))
    assert b["views"][0].shape == (10, 3, 8, 8)
    # A list value keeps its type (written as YAML).
    pipe = sp.Pipeline(f, overrides={"tensor.mean": [0.5, 0.5, 0.5], "tensor.std": [0.25, 0.25, 0.25]})
    assert next(iter(pipe))["views"][0].min() >= -2.0


def test_breaking_out_early_stops_the_pipeline(data_file):
    pipe = sp.Pipeline(data_file(count=2000, batch=4), threads=2)
    it = iter(pipe)
    next(it)
    it.close()
    with pytest.raises(StopIteration):
        next(it)
    for _ in zip(range(3), pipe):  # a fresh iteration after an abandoned one
        pass
    assert len(list(zip(range(2), pipe))) == 2


def test_digest_is_the_clis(data_file):
    f = data_file()
    it = sp.Pipeline(f, threads=2).iter_with_digest()
    assert it.digest is None
    n = sum(1 for _ in it)
    assert n == 8 and len(it.digest) == 32
    again = sp.Pipeline(f, threads=1).iter_with_digest()
    list(again)
    assert again.digest == it.digest
    exe = simclr_binary()
    if exe is None:
        pytest.skip("no simclr binary (set SIMCLR_BIN) to compare with `simclr bench --digest`")
    out = subprocess.run(
        [exe, "bench", str(f), "--digest", "--json", "--threads", "2", "--train-steps", "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(out.stdout)["digest"] == it.digest


def test_bad_arguments_raise_value_errors(data_file):
    f = data_file()
    with pytest.raises(ValueError, match="rank"):
        sp.Pipeline(f, rank=2, world_size=2)
    with pytest.raises(ValueError, match="threads"):
        sp.Pipeline(f, threads=0)


def test_kinds_lists_the_built_in_stages():
    names = {k for k, _, _ in sp.kinds()}
    assert {"synthetic_shapes", "random_resized_crop", "batch", "simclr_train"} <= names


def test_the_gil_is_released_while_batches_are_made(data_file):
    import threading

    ticks = [0]
    done = threading.Event()

    def spin():
        while not done.is_set():
            ticks[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        # Start the pipeline and wait for its first batch: a wait that held the GIL would stop
        # the spinning thread for the whole time the workers run.
        it = iter(sp.Pipeline(data_file(count=2000, batch=1000), threads=1))
        before = ticks[0]
        next(it)
        during = ticks[0] - before
    finally:
        done.set()
        t.join()
    assert during > 1000, during


def test_plugins_listed_in_the_file_load(tmp_path):
    import os

    search = os.environ.get("SIMCLR_PLUGIN_PATH", "")
    if not any(os.path.exists(os.path.join(d, "libmotion_blur_plugin.so")) for d in search.split(":") if d):
        pytest.skip("build the example plugin and set SIMCLR_PLUGIN_PATH (cargo build -p motion-blur-plugin)")
    f = tmp_path / "plugin.yaml"
    f.write_text(
        "name: plugin\nseed: 1\nplugins: [motion_blur_plugin]\nstages:\n"
        "  - { id: data, kind: synthetic_shapes, count: 16, size: 16 }\n  - { id: views, kind: views, count: 2 }\n"
        "  - { id: blur, kind: motion_blur, p: 1.0, length: [3, 5] }\n  - { id: tensor, kind: to_tensor }\n"
        "  - { id: batch, kind: batch, batch_size: 8 }\n"
    )
    pipe = sp.Pipeline(f, threads=2)
    assert "blur" in pipe.stages
    blurred = next(iter(pipe))["views"][0]
    plain = next(iter(sp.Pipeline(f, overrides={"blur": "off"})))["views"][0]
    assert blurred.shape == plain.shape and not np.array_equal(blurred, plain)
