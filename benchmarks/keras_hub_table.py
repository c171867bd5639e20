"""What `--rate`, `--attention-rate` and `--drop-path` do to each tiny keras-hub backbone.

Builds every backbone of tests/hub_models.py from its constructor (no
download), rewrites it three ways and prints one Markdown row per model: the
constructor arguments changed (old -> new), or dropout put into the graph, or
why nothing changed. docs/keras-hub.md holds the table this prints.

    python benchmarks/keras_hub_table.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hub_models import BACKBONES  # noqa: E402

import regularize  # noqa: E402
from regularize.core.policy import Policy  # noqa: E402
from regularize.core.report import Report  # noqa: E402
from regularize.keras3 import io  # noqa: E402

# The three flags, as the policies they make (rate 0: no general dropout from the tool).
FLAGS = {
    "--rate 0.2": Policy(rate=0.2),
    "--attention-rate 0.1": Policy(rate=0.0, attention_rate=0.1),
    "--drop-path 0.1": Policy(rate=0.0, drop_path=0.1),
}


def outcome(model, policy: Policy) -> tuple[str, object]:
    """A short cell for the table, and the new model (None when nothing changed)."""
    report = Report()
    try:
        new = regularize.add_dropout(model, policy=policy, report=report)
    except regularize.RegularizeError as err:
        return f"refused: {str(err)[:80]}", None
    changed = [s for s in report.sites if s.action in ("update", "remove")]
    inserted = [s for s in report.sites if s.action == "insert"]
    switch = any("crossed 0" in w for w in report.warnings)
    if changed and not inserted:
        text = ", ".join(f"`{s.kind}` {s.existing.split('=')[1]} → {s.rate:g}" for s in changed)
        return text + (" (kernel switch, warned)" if switch else "") + _unsaved(new), new
    if inserted:
        kept = type(new).__name__ == type(model).__name__
        return (
            f"{len(inserted)} layer{'s' if len(inserted) != 1 else ''} in the graph "
            f"({'class kept' if kept else 'Functional'})" + _unsaved(new),
            new,
        )
    reasons = "; ".join(sorted({s.reason for s in report.sites})) or "no candidate site"
    if report.with_dropout():
        return f"unchanged: {reasons}", None
    return f"exit 3: {reasons}", None


def _unsaved(model) -> str:
    """Empty if `model` saves (its file would load again); else why not."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            io.save_model(model, Path(folder) / "model.keras")
        except regularize.ModelSaveError as err:
            why = str(err).split("cannot be rebuilt from its saved config (")[-1].split(")")[0]
            return f"; not saved: the file would not load again ({why[:60]})"
    return ""


def main() -> None:
    print("| model | class | " + " | ".join(f"`{f}`" for f in FLAGS) + " |")
    print("|---|---|" + "---|" * len(FLAGS))
    for name, build in BACKBONES.items():
        model = build()
        cells = [outcome(model, policy)[0] for policy in FLAGS.values()]
        print(f"| {name} | {type(model).__name__} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
