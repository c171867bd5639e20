"""Fine-tuning one model under several dropout variants, to see what dropout buys.

`run_sweep` rewrites the model once per variant (`add_dropout`), always from the same
starting weights, and fine-tunes each variant with the same seed and the same order of
training batches; a variant is a dropout rate (rate 0 is the baseline), or a policy (a
preset or a TOML file) with its rate (`none` is the baseline). With several seeds every
variant is trained once per seed, and the table gives mean ± std and, for each variant, the
difference to the baseline paired by seed with its 95 % interval. It records per epoch the
train and validation accuracy, and writes to the output folder:

    variant-<label>-seed<seed>.json   one per finished run (the resume marker)
    variant-<label>-seed<seed>.keras  that run's variant at its best validation epoch
    results.json                      every number of every run, settings, the best variant
    curves.png                        train / validation curves of every variant

A sweep that is stopped and started again with the same folder trains only the runs without
a marker; the folder remembers the settings (model weights, data, epochs, ...) and refuses to
mix results of different sweeps.

The package's modules, one concern each: `variants` (what is compared; TensorFlow-free),
`data` (reading and checking the data), `training` (one variant, one seed), `resume` (the
output folder), `distributed` (several GPUs, KerasTuner across machines), `results` and
`stats` (the records, table, JSON and intervals), `plot`, `progress`, and `run` (the verb).
Keras is imported inside the functions that need it, so the checks of rates, policies and
data run before the slow TensorFlow import.
"""

from __future__ import annotations

from regularize.sweep.data import DataError
from regularize.sweep.data import check_data
from regularize.sweep.errors import SweepError
from regularize.sweep.plot import plot_curves
from regularize.sweep.results import PLOT_FILE
from regularize.sweep.results import RESULTS_FILE
from regularize.sweep.results import SweepResult
from regularize.sweep.results import VariantResult
from regularize.sweep.resume import output_folder
from regularize.sweep.run import run_sweep
from regularize.sweep.stats import PairedDifference
from regularize.sweep.stats import paired_difference
from regularize.sweep.variants import BASELINE
from regularize.sweep.variants import DEFAULT_RATES
from regularize.sweep.variants import SAME
from regularize.sweep.variants import Variant
from regularize.sweep.variants import check_rates
from regularize.sweep.variants import format_rate
from regularize.sweep.variants import parse_policies
from regularize.sweep.variants import parse_rates
from regularize.sweep.variants import policy_variants
from regularize.sweep.variants import rate_variants
from regularize.sweep.variants import setting_variants

__all__ = [
    "BASELINE",
    "DEFAULT_RATES",
    "PLOT_FILE",
    "RESULTS_FILE",
    "SAME",
    "DataError",
    "PairedDifference",
    "SweepError",
    "SweepResult",
    "Variant",
    "VariantResult",
    "check_data",
    "check_rates",
    "format_rate",
    "output_folder",
    "paired_difference",
    "parse_policies",
    "parse_rates",
    "plot_curves",
    "policy_variants",
    "rate_variants",
    "run_sweep",
    "setting_variants",
]
