"""What the shared core brought to the Keras 2 engine that only the Keras 3 one had.

Removing a mixed-precision dropout that also casts its input (float32 ->
float16) keeps that cast as an Identity of the same dtype policy, so
inference does not change. Before the shared core, the Keras 2 engine
passed the float32 tensor through, and its inference check refused to write
the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from regularize import keras2

_MAKE = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    import tf_keras
    L = tf_keras.layers
    inp = tf_keras.Input((4,))
    x = L.Dense(4, activation="relu", dtype="float32", name="fc")(inp)
    x = L.Dropout(0.5, dtype="mixed_float16", name="drop")(x)
    model = tf_keras.Model(inp, tf.identity(x))  # TFOpLambda: no autocast of its own
    model.save(sys.argv[1], save_format="h5")
    """
)


@pytest.mark.slow
def test_keras2_strip_keeps_the_cast_of_a_mixed_precision_dropout(tmp_path):
    source = tmp_path / "mixed.h5"
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
    subprocess.run([sys.executable, "-c", _MAKE, str(source)], check=True, env=env)
    stripped, removed = tmp_path / "stripped.h5", tmp_path / "removed.h5"
    answers = keras2.run_many(
        [
            {"mode": "strip", "input": str(source), "output": str(stripped)},
            {
                "mode": "add",
                "input": str(source),
                "output": str(removed),
                "policy": {"rate": 0.2, "existing": "remove"},
            },
        ]
    )
    for answer in answers:
        assert not isinstance(answer, Exception), answer
    assert [(s["layer"], s["action"]) for s in answers[0]["sites"]] == [("drop", "remove")]
    assert [(s["layer"], s["action"]) for s in answers[1]["sites"]] == [("fc", "remove")]
    assert stripped.is_file() and removed.is_file()
