"""What a sweep gives: one record per variant and seed, and their table and JSON."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

from regularize.sweep.stats import PairedDifference
from regularize.sweep.stats import mean_std
from regularize.sweep.stats import paired_difference
from regularize.sweep.variants import format_rate

RESULTS_FILE = "results.json"
PLOT_FILE = "curves.png"
SUMMARY_KEYS = ("train_accuracy", "val_accuracy", "best_val_accuracy", "gap")
# The number the best variant is chosen by, and the table's paired difference is about.
RANKED_BY = "best_val_accuracy"


@dataclasses.dataclass
class VariantResult:
    """What fine-tuning one variant with one seed gave.

    Attributes:
        label: The variant ("0.2" in a sweep over rates, "none" or "head@0.3" over policies).
        seed: The seed of this run (weights of new layers, dropout masks, batch order).
        rate: The dropout rate of the variant (0: the baseline).
        history: Per epoch, as `fit()` logs them: "loss", "accuracy" (running
            means over the epoch, dropout active), "val_loss", "val_accuracy".
        metric: The Keras metric behind "accuracy" (e.g. "sparse_categorical_accuracy").
        train_accuracy: Accuracy on the training data after the last epoch,
            in inference mode like the validation accuracy (the running
            accuracy that `fit()` logs is lowered by the dropout itself).
        val_accuracy: Validation accuracy after the last epoch.
        best_val_accuracy: Highest validation accuracy of any epoch.
        best_epoch: The epoch (1-based) of `best_val_accuracy`.
        gap: `train_accuracy - val_accuracy`, the generalization gap at the end.
        epochs: Epochs trained.
        seconds: Wall time of the fine-tuning.
        sites: What the rewrite did (`Report.summary_lines()`), then its
            warnings, each starting with "warning: ".
        model_file: The variant, with the weights of its best epoch (a file
            name in the output folder).
        resumed: Read from an earlier run instead of trained now.
    """

    label: str
    seed: int
    rate: float
    history: dict[str, list[float]]
    metric: str
    train_accuracy: float
    val_accuracy: float
    best_val_accuracy: float
    best_epoch: int
    gap: float
    epochs: int
    seconds: float
    sites: list[str]
    model_file: str
    resumed: bool = False

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("resumed")
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> VariantResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"resumed"}
        return cls(**{k: data[k] for k in names}, resumed=True)


@dataclasses.dataclass
class SweepResult:
    """Every variant of one sweep, for every seed.

    Attributes:
        variants: One `VariantResult` per variant and seed: variant by variant (the
            baseline first), seeds in the given order within each.
        labels: The variants' labels, the baseline first.
        seeds: The seeds, in the given order.
        best_label: The variant with the highest best validation accuracy (its mean over
            seeds; ties: the lower validation loss at that epoch, then the earlier
            variant); None for a KerasTuner worker that was given no trial.
        out: The output folder.
        compile_note: How the variants were compiled (the model's own config,
            or the stated default).
        notes: Other things the user should know (e.g. rate 0 added).
        settings: What a resumed run must share with this one.
        best_model: Where `save_best` wrote the best variant (its first seed's run), if asked.
        written: Whether this process wrote results.json and curves.png (a
            KerasTuner worker leaves that to the chief).
    """

    variants: list[VariantResult]
    labels: list[str]
    seeds: list[int]
    best_label: str | None
    out: Path
    compile_note: str
    notes: list[str]
    settings: dict
    best_model: Path | None = None
    written: bool = False

    @property
    def results_path(self) -> Path:
        return self.out / RESULTS_FILE

    @property
    def plot_path(self) -> Path:
        return self.out / PLOT_FILE

    @property
    def baseline(self) -> str:
        return self.labels[0]

    @property
    def best_rate(self) -> float | None:
        """The rate of the best variant (in a sweep over rates, the best rate)."""
        return None if self.best_label is None else self.best.rate

    @property
    def best(self) -> VariantResult:
        """The best variant's run with the first seed."""
        return self.runs(self.best_label)[0]

    def runs(self, label: str) -> list[VariantResult]:
        """The runs of variant `label`, one per seed, in the order of the seeds."""
        return [v for v in self.variants if v.label == label]

    def summary(self) -> dict[str, dict[str, dict]]:
        """label -> key -> {"mean", "std", "values"} over seeds, for each of SUMMARY_KEYS."""
        summary = {}
        for label in self.labels:
            runs = self.runs(label)
            if not runs:
                continue
            summary[label] = {}
            for key in SUMMARY_KEYS:
                values = [float(getattr(v, key)) for v in runs]
                mean, std = mean_std(values)
                summary[label][key] = {"mean": mean, "std": std, "values": values}
        return summary

    def differences(self) -> dict[str, dict[str, PairedDifference]]:
        """label -> key -> the paired difference to the baseline over seeds."""
        base = {v.seed: v for v in self.runs(self.baseline)}
        out = {}
        for label in self.labels[1:]:
            runs = [v for v in self.runs(label) if v.seed in base]
            if not runs:
                continue
            out[label] = {
                key: paired_difference(
                    [getattr(v, key) for v in runs], [getattr(base[v.seed], key) for v in runs]
                )
                for key in SUMMARY_KEYS
            }
        return out

    def to_dict(self) -> dict:
        return {
            "best": self.best_label,
            "best_rate": self.best_rate,
            "baseline": self.baseline,
            "seeds": self.seeds,
            "ranked_by": RANKED_BY,
            "compile": self.compile_note,
            "notes": self.notes,
            "settings": self.settings,
            "plot": str(self.plot_path),
            "best_model": None if self.best_model is None else str(self.best_model),
            "summary": self.summary(),
            "vs_baseline": {
                label: {key: d.to_dict() for key, d in by_key.items()}
                for label, by_key in self.differences().items()
            },
            "variants": [v.to_dict() for v in self.variants],
        }

    def table(self) -> str:
        """The results as an aligned text table; the best variant is marked `*`."""
        if len(self.seeds) == 1:
            return self._table_one_seed()
        return self._table_over_seeds()

    def _first_column(self) -> str:
        is_rates = all(v.label == format_rate(v.rate) for v in self.variants)
        return "rate" if is_rates else "variant"

    def _table_one_seed(self) -> str:
        header = (self._first_column(), "train acc", "val acc", "best val acc", "gap", "epochs")
        rows = [header]
        for v in self.variants:
            mark = " *" if v.label == self.best_label else ""
            rows.append(
                (
                    f"{v.label}{mark}",
                    f"{v.train_accuracy:.4f}",
                    f"{v.val_accuracy:.4f}",
                    f"{v.best_val_accuracy:.4f} (epoch {v.best_epoch})",
                    f"{v.gap:+.4f}",
                    str(v.epochs),
                )
            )
        what = self._first_column()
        return _aligned(rows) + (
            f"\n* best {what} (highest best validation accuracy); train and val acc: "
            "inference mode, after the last epoch; gap = train acc - val acc"
        )

    def _table_over_seeds(self) -> str:
        summary = self.summary()
        differences = self.differences()
        delta = f"best val acc - {self.baseline} [95% CI]"
        header = (self._first_column(), "val acc", "best val acc", "gap", delta, "")
        rows = [header]
        for label, numbers in summary.items():
            mark = " *" if label == self.best_label else ""
            cells = [f"{label}{mark}"]
            for key, sign in (("val_accuracy", ""), (RANKED_BY, ""), ("gap", "+")):
                mean, std = numbers[key]["mean"], numbers[key]["std"]
                cells.append(f"{mean:{sign}.4f} ± {std:.4f}")
            if label in differences:
                d = differences[label][RANKED_BY]
                cells.append(f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]")
                cells.append(_verdict(d))
            else:
                cells += ["(baseline)", ""]
            rows.append(tuple(cells))
        n = len(self.seeds)
        return _aligned(rows) + (
            f"\nmean ± std over {n} seeds ({', '.join(map(str, self.seeds))}); * best variant "
            "(highest mean best validation accuracy); val acc: inference mode, after the last "
            "epoch; gap = train acc - val acc; the difference to the baseline is paired by "
            "seed, with its 95% t interval"
        )


def _verdict(d: PairedDifference) -> str:
    if not d.distinguishable:
        return "not distinguishable from the baseline"
    return "higher than the baseline" if d.mean > 0 else "lower than the baseline"


def _aligned(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def best_label(results: list[VariantResult], labels: list[str]) -> str:
    """The label with the highest mean best validation accuracy over its runs.

    Ties: the lower mean validation loss at the best epochs, then the earlier label.
    """

    def key(label: str):
        runs = [v for v in results if v.label == label]
        accuracy = math.fsum(v.best_val_accuracy for v in runs) / len(runs)
        losses = [v.history["val_loss"][v.best_epoch - 1] for v in runs]
        loss = math.fsum(losses) / len(losses)
        return (-accuracy, loss if math.isfinite(loss) else math.inf, labels.index(label))

    return min((label for label in labels if any(v.label == label for v in results)), key=key)
