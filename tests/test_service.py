"""`regularize.process`: one file-level service for both engines (the CLI's whole job but printing).

Each rewrite is checked for structure (the report and the layers of the written file),
bit-exact inference against outputs captured before the rewrite, and that the written file
reloads; each refusal for its one-line error and for leaving nothing behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import regularize
from regularize import service
from regularize.core.errors import ModelLoadError
from regularize.core.errors import ModelSaveError
from regularize.core.errors import UnknownApplicationError
from regularize.core.policy import Policy
from regularize.core.rules import Rule

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
X = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")


@pytest.fixture(scope="module")
def cnn_before():
    """The committed CNN fixture and its outputs, captured before any rewrite."""
    model = keras.models.load_model(FIXTURES / "cnn.keras")
    x = np.random.default_rng(0).normal(size=(2, *model.input_shape[1:])).astype("float32")
    return x, np.asarray(model(x, training=False)), sorted(w.name for w in model.weights)


@pytest.fixture
def cnn(tmp_path):
    path = tmp_path / "cnn.keras"
    shutil.copy(FIXTURES / "cnn.keras", path)
    return path


def _dropout_layers(model) -> dict:
    return {
        layer.name: (type(layer).__name__, layer.rate)
        for layer in model.layers
        if "Dropout" in type(layer).__name__
    }


def test_add_writes_the_default_output_beside_the_input(cnn, cnn_before):
    x, expected, weights = cnn_before
    before = cnn.read_bytes()
    steps = []
    outcome = regularize.process(cnn, "add", policy=Policy(rate=0.2), step=steps.append)
    assert outcome.output == cnn.with_name("cnn_dropout.keras")
    assert outcome.written and not outcome.empty
    assert cnn.read_bytes() == before  # the input is never changed
    new = keras.models.load_model(outcome.output)
    inserted = {f"{s.layer}__dropout": (s.kind, s.rate) for s in outcome.report.sites}
    inserted = {k: v for k, v in inserted.items() if v[1] is not None}
    assert len(inserted) == 5 and _dropout_layers(new) == inserted
    np.testing.assert_array_equal(np.asarray(new(x, training=False)), expected)
    assert sorted(w.name for w in new.weights) == weights
    assert steps[0] == "importing TensorFlow" and steps[-1].startswith("writing ")


def test_plan_and_dry_run_write_nothing(cnn):
    planned = regularize.process(cnn, "plan", policy=Policy(rate=0.2))
    assert planned.output is None and not planned.written
    dry = regularize.process(cnn, "add", policy=Policy(rate=0.2), dry_run=True)
    assert dry.output == cnn.with_name("cnn_dropout.keras") and not dry.written
    assert not dry.output.exists()
    assert dry.report.sites == planned.report.sites
    assert sorted(p.name for p in cnn.parent.iterdir()) == ["cnn.keras"]


def test_an_empty_result_is_not_written_unless_allowed(cnn, cnn_before):
    x, expected, _ = cnn_before
    skip_all = Policy(rate=0.3, rules=(Rule(match="*", skip=True),))
    outcome = regularize.process(cnn, "add", policy=skip_all)
    assert outcome.empty and not outcome.written
    assert not outcome.output.exists()
    assert {s.action for s in outcome.report.sites} == {"skip"}
    allowed = regularize.process(cnn, "add", policy=skip_all, allow_empty=True)
    assert allowed.empty and allowed.written
    new = keras.models.load_model(allowed.output)
    assert _dropout_layers(new) == {}
    np.testing.assert_array_equal(np.asarray(new(x, training=False)), expected)


def test_strip_removes_what_add_inserted(cnn, cnn_before):
    x, expected, _ = cnn_before
    added = regularize.process(cnn, "add", policy=Policy(rate=0.2))
    stripped = regularize.process(added.output, "strip")
    assert stripped.output == cnn.with_name("cnn_dropout_nodropout.keras")
    assert stripped.written and not stripped.empty
    removed = {s.layer for s in stripped.report.sites if s.action == "remove"}
    assert removed == set(_dropout_layers(keras.models.load_model(added.output)))
    new = keras.models.load_model(stripped.output)
    assert _dropout_layers(new) == {}
    np.testing.assert_array_equal(np.asarray(new(x, training=False)), expected)


def test_the_output_rule_is_checked_before_loading(cnn):
    before = cnn.read_bytes()
    with pytest.raises(ModelSaveError, match="input"):
        regularize.process(cnn, "add", output=cnn, overwrite=True)
    existing = cnn.with_name("taken.keras")
    existing.write_bytes(b"mine")
    with pytest.raises(ModelSaveError, match="exists"):
        regularize.process(cnn, "add", output=existing)
    assert cnn.read_bytes() == before and existing.read_bytes() == b"mine"


def test_keras2_h5_goes_to_the_keras2_engine(tmp_path):
    source = tmp_path / "pruned.h5"  # a tfmot-pruned model: only Keras 2 reads it
    shutil.copy(FIXTURES / "keras2" / "pruned.h5", source)
    assert service.engine_of(source) == "keras2"
    outcome = regularize.process(source, "add", policy=Policy(rate=0.25))
    assert outcome.output == tmp_path / "pruned_dropout.h5" and outcome.written
    with h5py.File(outcome.output, "r") as f:
        assert str(f.attrs["keras_version"]).startswith("2.")
        config = f.attrs["model_config"]
    inserted = [f"{s.layer}__dropout" for s in outcome.report.sites if s.action == "insert"]
    assert inserted and all(f'"{name}"' in str(config) for name in inserted)
    assert all(s.rate == 0.25 for s in outcome.report.sites if s.action == "insert")
    # No stray staging folder beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.h5", "pruned_dropout.h5"]


def test_keras2_empty_result_is_not_published(tmp_path):
    source = tmp_path / "pruned.h5"
    shutil.copy(FIXTURES / "keras2" / "pruned.h5", source)
    skip_all = Policy(rate=0.3, rules=(Rule(match="*", skip=True),))
    outcome = regularize.process(source, "add", policy=skip_all)
    assert outcome.empty and not outcome.written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.h5"]


def test_application_options_only_for_applications(tmp_path, cnn):
    source = tmp_path / "pruned.h5"
    shutil.copy(FIXTURES / "keras2" / "pruned.h5", source)
    for path in (source, cnn):
        with pytest.raises(ModelLoadError, match="only to a `keras.applications.NAME` input"):
            regularize.process(path, "add", dry_run=True, weights=None)


def test_unknown_application_is_its_own_error():
    with pytest.raises(UnknownApplicationError, match="ResNet5O"):
        regularize.process("keras.applications.ResNet5O", "plan")


def test_the_api_warns_when_the_policy_puts_dropout_nowhere(cnn, cnn_before):
    import warnings

    from regularize.core.errors import RegularizeWarning

    x, expected, _ = cnn_before
    model = keras.models.load_model(cnn)
    skip_all = Policy(rate=0.3, rules=(Rule(match="*", skip=True),))
    with pytest.warns(RegularizeWarning, match="put dropout nowhere.*6 candidate sites"):
        new = regularize.add_dropout(model, policy=skip_all)
    assert _dropout_layers(new) == {}
    np.testing.assert_array_equal(np.asarray(new(x, training=False)), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegularizeWarning)
        regularize.add_dropout(model, rate=0.0)  # asks for none: no warning
        assert _dropout_layers(regularize.add_dropout(model, rate=0.1))


def test_one_job_resolves_the_input_once_and_checks_the_output_before_and_at_the_write(
    cnn, cnn_before, monkeypatch
):
    """The input is resolved once; the output is checked by the pre-flight and by the write."""
    from regularize.core import kinds
    from regularize.keras3 import io

    calls = {"detect": 0, "output rule": 0}
    detect, rule = kinds.detect, kinds.check_output_path

    def counted_detect(*args, **kwargs):
        calls["detect"] += 1
        return detect(*args, **kwargs)

    def counted_rule(*args, **kwargs):
        calls["output rule"] += 1
        return rule(*args, **kwargs)

    monkeypatch.setattr(kinds, "detect", counted_detect)
    monkeypatch.setattr(kinds, "check_output_path", counted_rule)
    monkeypatch.setattr(io, "check_output_path", counted_rule)
    job = service.prepare(cnn, "add")
    assert (job.kind, job.engine, job.write) == (service.FILE, "keras3", True)
    assert job.output == cnn.with_name("cnn_dropout.keras")
    assert calls == {"detect": 1, "output rule": 1}
    outcome = service.execute(job, policy=Policy(rate=0.2))
    assert calls == {"detect": 1, "output rule": 2}  # the write's own check, nothing else
    assert outcome.written and outcome.output == job.output
    x, expected, _ = cnn_before
    new = keras.models.load_model(job.output)
    assert _dropout_layers(new)  # the rewrite happened
    np.testing.assert_array_equal(np.asarray(new(x, training=False)), expected)


def test_a_file_that_appears_at_the_output_during_the_run_is_not_replaced(cnn, monkeypatch):
    from regularize.keras3 import io

    job = service.prepare(cnn, "add")  # the output is free now
    load = io.load_model

    def load_then_someone_writes_the_output(*args, **kwargs):
        model = load(*args, **kwargs)
        job.output.write_bytes(b"someone else's file")
        return model

    monkeypatch.setattr(io, "load_model", load_then_someone_writes_the_output)
    with pytest.raises(ModelSaveError, match="already exists"):
        service.execute(job, policy=Policy(rate=0.2))
    assert job.output.read_bytes() == b"someone else's file"


def test_the_pre_flight_refuses_a_taken_output_before_any_model_is_read(cnn, tmp_path):
    taken = tmp_path / "taken.keras"
    taken.write_bytes(b"not mine")
    with pytest.raises(ModelSaveError, match="already exists"):
        service.prepare(cnn, "add", output=taken)
    assert taken.read_bytes() == b"not mine"
    job = service.prepare(cnn, "add", output=taken, dry_run=True)
    assert (job.output, job.write) == (taken, False)
    assert service.prepare(cnn, "plan").output is None
