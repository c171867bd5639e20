"""Golden plans: `regularize inspect` on each fixture model under each policy.

A case is a file `fixtures/golden/<model file>.<policy name>.txt`: the model
is `fixtures/<model file>`, the policy `fixtures/policies/<policy name>.toml`.
A new case is a new file. Set REGULARIZE_UPDATE_GOLDEN=1 to (re)write them
after a deliberate change, and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from regularize.cli import cli

FIXTURES = Path(__file__).parent.parent / "fixtures"
GOLDEN = sorted((FIXTURES / "golden").glob("*.txt"))
UPDATE = os.environ.get("REGULARIZE_UPDATE_GOLDEN") == "1"


def _inspect(model: Path, policy: Path) -> str:
    # --allow-empty: a plan without dropout is a case too (its warning is recorded).
    args = ["inspect", str(model), "--policy", str(policy), "--allow-empty"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = result.stdout + "".join(f"stderr: {line}\n" for line in result.stderr.splitlines())
    return text.replace(str(FIXTURES), "fixtures")


def test_every_fixture_model_and_policy_has_golden_plans():
    for model in ("cnn.keras", "lstm.keras", "mlp.h5"):
        for policy in (FIXTURES / "policies").glob("*.toml"):
            path = FIXTURES / "golden" / f"{model}.{policy.stem}.txt"
            if UPDATE and not path.exists():
                path.write_text(_inspect(FIXTURES / model, policy))
            assert path.exists(), f"no golden plan {path.name}"


@pytest.mark.parametrize("golden", GOLDEN, ids=[p.name for p in GOLDEN])
def test_plan_matches_golden_file(golden):
    model_name, policy_name, _ = golden.name.rsplit(".", 2)
    text = _inspect(FIXTURES / model_name, FIXTURES / "policies" / f"{policy_name}.toml")
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text()
