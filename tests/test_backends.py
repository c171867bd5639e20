"""The Keras 3 path on the JAX backend, with TensorFlow out of reach.

The rewrite uses `keras` APIs only, so it must run wherever Keras runs. A child process with
`KERAS_BACKEND=jax` blocks every `import tensorflow` (as if it were not installed), then
rewrites each factory model, saves and reloads it, runs the CLI and fine-tunes; the tests
assert on its JSON report. Keras itself looks for TensorFlow lazily on other backends (its
serializer checks for `tf.TensorShape` when TensorFlow is installed), so blocking the import
is the way to prove the path does not need it.

These tests run in the TensorFlow session too (the child picks its own backend), and CI runs
this file again under `KERAS_BACKEND=jax` with the rest of the JAX subset.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import cnn_functional
from helpers import inserted
from helpers import masked_sequence
from helpers import mlp_sequential
from helpers import multi_io_dict
from helpers import nested_two_levels
from helpers import predict

import regularize

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# Modules that import TensorFlow by design: the Keras 2 engine (run in its own
# process) and the sweep's tf.data input and tf.distribute strategies. Every other
# module of the package is on the Keras 3 path and must not.
TENSORFLOW_BY_DESIGN = {
    "regularize.keras2.engine",
    "regularize.keras2.rewrite",
    "regularize.sweep.data",
    "regularize.sweep.distributed",
}
TF_PACKAGES = ("tensorflow", "tf_keras", "tensorflow_model_optimization")
# One of each path through the engine: Sequential + compile config, Functional with BN, nested
# models, dict inputs and outputs, a rebuilt LSTM (with a mask). tests/test_rewrite.py runs
# every factory on the session's backend; what is new here is the process without TensorFlow.
# (`recurrent` is left out: its six RNN layers cost JAX ~30 s of compiling.)
JAX_FACTORIES = (
    mlp_sequential,
    cnn_functional,
    nested_two_levels,
    multi_io_dict,
    masked_sequence,
)

CHILD = textwrap.dedent(
    """
    import json
    import os
    import sys
    import traceback

    attempts = []


    class NoTensorFlow:
        # Makes `import tensorflow` fail as if TensorFlow were not installed, and records
        # who asked.
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                # The frame that asked, outside importlib: Keras' lazy module, or a
                # direct import.
                asker = [
                    f"{f.filename}:{f.lineno}"
                    for f in traceback.extract_stack()[:-1]
                    if "importlib" not in f.filename
                ][-1]
                attempts.append({"module": name, "from": asker})
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, NoTensorFlow())
    sys.path.insert(0, sys.argv[1])
    out = sys.argv[2]

    import keras
    import numpy as np
    from click.testing import CliRunner
    import helpers
    from helpers import inserted
    from helpers import predict
    from helpers import rnn_dropout

    import regularize
    from regularize.cli import cli

    result = {"backend": keras.backend.backend(), "factories": {}}
    for name in sys.argv[3].split(","):
        factory = getattr(helpers, name)
        case = factory()
        new = regularize.add_dropout(case.model, 0.3)
        path = f"{out}/{factory.__name__}.keras"
        regularize.save_model(new, path)
        loaded = regularize.load_model(path)
        stripped = regularize.remove_dropout(new)
        old_out = predict(case.model, case.x)
        result["factories"][factory.__name__] = {
            "expected": {k: list(v) for k, v in case.expected.items()},
            "inserted": {k: list(v) for k, v in {**inserted(new), **rnn_dropout(new)}.items()},
            "exact": all(np.array_equal(a, b) for a, b in zip(old_out, predict(new, case.x))),
            "reload_exact": all(
                np.array_equal(a, b)
                for a, b in zip(predict(new, case.x), predict(loaded, case.x))
            ),
            "reloaded_inserted": sorted(inserted(loaded)),
            "stripped_exact": all(
                np.array_equal(a, b) for a, b in zip(old_out, predict(stripped, case.x))
            ),
            "stripped_inserted": sorted(inserted(stripped)),
        }
        if factory.__name__ == "cnn_functional":
            np.save(f"{out}/cnn_x.npy", case.x)
            np.save(f"{out}/cnn_y.npy", predict(new, case.x)[0])
            case.model.compile(optimizer="adam", loss="mse")
            case.model.save(f"{out}/cnn_compiled.keras")

    run = CliRunner().invoke(
        cli,
        ["add-dropout", f"{out}/cnn_compiled.keras", "-o", f"{out}/cli.keras", "--rate", "0.2"],
    )
    result["cli"] = {"exit_code": run.exit_code, "stdout": run.stdout, "stderr": run.stderr}
    tuned = keras.models.load_model(f"{out}/cli.keras")
    x = np.random.default_rng(0).normal(size=(16, 12, 12, 3)).astype("float32")
    y = np.random.default_rng(1).normal(size=(16, 2)).astype("float32")
    before = [np.array(w) for w in tuned.trainable_weights]
    history = tuned.fit(x, y, batch_size=8, epochs=1, verbose=0)
    result["fit"] = {
        "loss": history.history["loss"],
        "changed": sum(
            not np.array_equal(a, np.array(b)) for a, b in zip(before, tuned.trainable_weights)
        ),
        "trainable": len(before),
        "rates": sorted({layer.rate for layer in tuned.layers if hasattr(layer, "rate")}),
    }
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    result["tensorflow_attempts"] = attempts
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """Runs CHILD once on the JAX backend with TensorFlow blocked; returns its report."""
    import jax  # noqa: F401  (the `test` extra installs it: missing, the test fails)

    out = tmp_path_factory.mktemp("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(TESTS),
            str(out),
            ",".join(f.__name__ for f in JAX_FACTORIES),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=out,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return out, json.loads(run.stdout.strip().splitlines()[-1])


def _modules() -> dict:
    """Every module of the package (found by walking it, not listed by hand): name -> file."""
    found = {"regularize": Path(regularize.__file__)}
    for info in pkgutil.walk_packages(regularize.__path__, "regularize."):
        spec = info.module_finder.find_spec(info.name, None)
        found[info.name] = Path(spec.origin)
    return found


def _tensorflow_imports(path: Path) -> list:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            continue
        found += [
            f"{path.name}:{node.lineno} {m}" for m in modules if m.split(".")[0] in TF_PACKAGES
        ]
    return found


def test_keras3_path_imports_no_tensorflow_module():
    """No `import tensorflow` (nor tf_keras, tfmot) anywhere in the Keras 3 path's code.

    The Keras 3 path is every module but those that need TensorFlow by design;
    each of those must still import it (or the list is stale).
    """
    modules = _modules()
    assert {"regularize.api", "regularize.keras3.rewrite", "regularize.core.walk"} <= set(modules)
    assert TENSORFLOW_BY_DESIGN <= set(modules)
    found = {name: _tensorflow_imports(path) for name, path in modules.items()}
    assert {name for name, imports in found.items() if imports} == TENSORFLOW_BY_DESIGN, found


def test_jax_backend_is_used(jax_run):
    _, result = jax_run
    assert result["backend"] == "jax"


@pytest.mark.parametrize("factory", JAX_FACTORIES, ids=lambda f: f.__name__)
def test_jax_rewrite_exact_and_reloads(jax_run, factory):
    _, result = jax_run
    found = result["factories"][factory.__name__]
    expected = {k: tuple(v) for k, v in found["expected"].items()}
    assert expected  # helpers' expectations, as the child read them
    assert {k: tuple(v) for k, v in found["inserted"].items()} == expected
    assert found["exact"] is True
    assert found["reload_exact"] is True
    own = sorted(k for k, v in expected.items() if v[0] != "recurrent")
    assert found["reloaded_inserted"] == own
    assert found["stripped_exact"] is True
    assert found["stripped_inserted"] == []


def test_jax_cli_runs_without_tensorflow(jax_run):
    out, result = jax_run
    cli = result["cli"]
    assert cli["exit_code"] == 0, cli
    assert cli["stderr"] == ""
    assert cli["stdout"].splitlines()[-1] == f"wrote {out / 'cli.keras'}"


def test_jax_fine_tunes_cli_output(jax_run):
    _, result = jax_run
    fit = result["fit"]
    assert np.isfinite(fit["loss"][0])
    assert fit["changed"] == fit["trainable"] > 0
    assert fit["rates"] == [0.2]


def test_jax_path_never_imports_tensorflow(jax_run):
    """Keras may probe for TensorFlow (the probe fails here); regularize's engine never asks."""
    _, result = jax_run
    assert result["tensorflow_imported"] is False
    package = str(ROOT / "regularize") + os.sep
    # The CLI may preload TensorFlow, when installed, to keep its C++ banner off stderr.
    cli = (package + "cli.py:", package + "cli" + os.sep)  # a module, or a package
    direct = [
        a
        for a in result["tensorflow_attempts"]
        if a["from"].startswith(package) and not a["from"].startswith(cli)
    ]
    assert direct == []


def test_file_rewritten_on_jax_loads_on_this_backend(jax_run):
    """A `.keras` file is backend-neutral: JAX's output loads and predicts here."""
    out, _ = jax_run
    loaded = keras.models.load_model(out / "cnn_functional.keras")
    assert sorted(inserted(loaded)) == sorted(
        ["r2__dropout", "c3__dropout", "leaky__dropout", "fc__dropout"]
    )
    x, expected = np.load(out / "cnn_x.npy"), np.load(out / "cnn_y.npy")
    received = predict(loaded, x)[0]
    if keras.backend.backend() == "jax":
        np.testing.assert_array_equal(received, expected)
    else:  # another backend's kernels: equal up to float rounding
        np.testing.assert_allclose(received, expected, rtol=1e-5, atol=1e-6)
    report = regularize.Report()
    again = regularize.add_dropout(loaded, 0.3, report=report)
    assert report.changed() == 0
    np.testing.assert_array_equal(predict(again, x)[0], received)


# The backend-independent tests, run again on JAX in a child pytest. CI runs it
# (jax is in the `test` extra); here it is part of the one test command.
JAX_SUBSET = [
    "tests/test_rewrite.py",
    "tests/test_plan.py",
    "tests/test_io.py",
    "tests/test_cli.py",
    "tests/test_mc.py",
    "tests/test_backends.py",
]


@pytest.mark.slow
def test_the_backend_independent_tests_pass_on_jax(tmp_path):
    import jax  # noqa: F401  (the `test` extra installs it: missing, the test fails)

    if os.environ.get("KERAS_BACKEND") == "jax":
        pytest.skip("already running on JAX (this is the child run)")
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    # A base temp of its own: a new pytest session prunes all but the last
    # three numbered ones, which would delete this session's, in use.
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
        + [f"--basetemp={tmp_path / 'jax'}"]
        + JAX_SUBSET,
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
        cwd=ROOT,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
