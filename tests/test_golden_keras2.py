"""Golden plans of the Keras 2 engine: each Keras 2 fixture under each fixture policy.

The twin of tests/test_golden.py for the tf_keras adapter of the rewrite
core. A case is a file `fixtures/golden/keras2/<model>.<policy name>.txt`:
the model is `fixtures/keras2/<model>`, the policy
`fixtures/policies/<policy name>.toml`. All plans run in one engine child
(`keras2.run_many`), so any drift between the two adapters, or in the core,
shows as a diff in a text file. Set REGULARIZE_UPDATE_GOLDEN=1 to (re)write
them after a deliberate change, and review the diff.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from regularize import keras2
from regularize.core.policy import Policy

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
K2 = FIXTURES / "keras2"
GOLDEN = FIXTURES / "golden" / "keras2"
UPDATE = os.environ.get("REGULARIZE_UPDATE_GOLDEN") == "1"
# The Keras 2 fixtures the engine plans without options (lambda.h5 is refused
# in safe mode; custom.h5 needs its module, passed below).
MODELS = ("plain.h5", "pruned.h5", "qat.h5", "rnn_oplambda.h5", "custom.h5", "savedmodel")
POLICIES = sorted(p.stem for p in (FIXTURES / "policies").glob("*.toml"))
CASES = [(model, policy) for model in MODELS for policy in POLICIES]


def _request(model: str, policy: str) -> dict:
    path = FIXTURES / "policies" / f"{policy}.toml"
    source = f"fixtures/policies/{policy}.toml"
    request = {
        "mode": "plan",
        "input": str(K2 / model),
        "policy": Policy.from_dict(tomllib.loads(path.read_text()), source=source),
    }
    if model == "custom.h5":
        request["custom_objects"] = str(K2 / "custom_layers.py")
    return request


def _render(result) -> str:
    if isinstance(result, Exception):
        return f"error: {type(result).__name__}: {result}\n"
    report = keras2.to_report(result)
    warnings = "".join(f"warning: {line}\n" for line in report.warnings)
    return report.render_plan() + "\n" + warnings


@pytest.fixture(scope="module")
def plans() -> dict[tuple[str, str], str]:
    answers = keras2.run_many([_request(model, policy) for model, policy in CASES])
    return {case: _render(answer) for case, answer in zip(CASES, answers, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("model,policy", CASES, ids=[f"{m}.{p}" for m, p in CASES])
def test_keras2_plan_matches_golden_file(plans, model, policy):
    golden = GOLDEN / f"{model}.{policy}.txt"
    text = plans[(model, policy)]
    if UPDATE:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden plan {golden.name}"
    assert text == golden.read_text()
