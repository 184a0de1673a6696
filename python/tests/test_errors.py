"""Errors carry the CLI's text: FILE:LINE:COL for the file, stage and sample while running."""

import re

import pytest

import simclr_pipeline as sp


def test_pipeline_error_is_an_exception():
    assert issubclass(sp.PipelineError, Exception)
    assert sp.PipelineError.__module__ == "simclr_pipeline"


def test_a_misspelt_field_names_file_line_column_and_stage(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(
        "name: bad\nstages:\n  - { id: data, kind: synthetic_shapes, count: 8 }\n"
        "  - { id: crop, kind: random_resized_crop, size: 8, scael: [0.2, 1.0] }\n"
        "  - { id: tensor, kind: to_tensor }\n  - { id: batch, kind: batch, batch_size: 4 }\n"
    )
    for call in (lambda: sp.validate(f), lambda: sp.Pipeline(f)):
        with pytest.raises(sp.PipelineError) as e:
            call()
        msg = str(e.value)
        assert re.search(re.escape(str(f)) + r":4:\d+: stage 'crop'", msg), msg
        assert "scael" in msg and "scale" in msg  # the did-you-mean hint
        assert "1 error found" in msg


def test_invalid_yaml_and_missing_files(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: x\nstages: [\n")
    with pytest.raises(sp.PipelineError, match=re.escape(str(f)) + r":\d+:\d+"):
        sp.Pipeline(f)
    with pytest.raises(sp.PipelineError, match="nope.yaml"):
        sp.validate(tmp_path / "nope.yaml")


def test_bad_overrides(tmp_path, data_file):
    f = data_file()
    with pytest.raises(sp.PipelineError, match="crop"):
        sp.Pipeline(f, overrides={"crop.size": -3})
    with pytest.raises(sp.PipelineError, match="not a string"):
        sp.Pipeline(f, overrides={3: 4})
    sp.validate(f, overrides={"crop.size": 8})


def test_a_pipeline_without_a_batch_stage(tmp_path):
    f = tmp_path / "nobatch.yaml"
    f.write_text("name: nb\nstages:\n  - { id: data, kind: synthetic_shapes, count: 8 }\n  - { id: t, kind: to_tensor }\n")
    with pytest.raises(sp.PipelineError, match="no batch stage"):
        sp.Pipeline(f)


def test_a_failing_stage_names_stage_and_sample(tmp_path):
    images = tmp_path / "imgs" / "cls"
    images.mkdir(parents=True)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    f = tmp_path / "folder.yaml"
    f.write_text(
        f"name: folder\nstages:\n  - {{ id: data, kind: image_folder, path: {tmp_path / 'imgs'} }}\n"
        "  - { id: decode, kind: decode }\n  - { id: crop, kind: random_resized_crop, size: 8 }\n"
        "  - { id: tensor, kind: to_tensor }\n  - { id: batch, kind: batch, batch_size: 1 }\n"
    )
    pipe = sp.Pipeline(f)
    with pytest.raises(sp.PipelineError) as e:
        list(pipe)
    msg = str(e.value)
    assert "stage 'decode'" in msg and "sample 0" in msg and "broken.jpg" in msg, msg
