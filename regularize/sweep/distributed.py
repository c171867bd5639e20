"""Where a sweep runs: one process, every GPU of a machine, or KerasTuner across machines.

`strategy="mirrored"` trains each variant data-parallel on every GPU of this machine
(`tf.distribute.MirroredStrategy`; the model is loaded inside its scope and `batch_size` is
the global batch).

`keras_tuner=True` runs the variants (each variant and seed) as KerasTuner trials: a
`GridSearch` over them. Started with KerasTuner's environment variables
(`KERASTUNER_TUNER_ID` = "chief" or "tuner0", "tuner1", ...; `KERASTUNER_ORACLE_IP`,
`KERASTUNER_ORACLE_PORT`), the same command becomes the chief, which hands out the trials
and, once every one is done, writes results.json and curves.png, or a worker, which trains
the trials it is given. `out` must be a folder every machine sees (the workers write their
variants there, the chief reads them). Why not `tf.distribute.MultiWorkerMirroredStrategy`:
`fit()` fails under it in Keras 3 (keras-team/keras#20585, open; tried here with Keras 3.15
and TF 2.21: "Attempt to convert a value (PerReplica ...) to a Tensor").
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

from regularize.sweep.errors import SweepError

STRATEGIES = ("mirrored",)


class Role(enum.StrEnum):
    """What this process does in the sweep.

    MAIN trains and writes everything. REPLICA is a non-chief worker of a multi-worker
    `tf.distribute` strategy: it trains and writes nothing. TUNER_CHIEF hands out the
    trials, then writes the results. TUNER_WORKER trains the trials it is given and writes
    their variant files.
    """

    MAIN = "main"
    REPLICA = "replica"
    TUNER_CHIEF = "tuner-chief"
    TUNER_WORKER = "tuner-worker"


def role_of(strategy, keras_tuner: bool) -> Role:
    """This process's `Role`, from the strategy's cluster and KerasTuner's variables."""
    if not _is_chief(strategy):
        return Role.REPLICA
    if keras_tuner and "KERASTUNER_ORACLE_IP" in os.environ:
        if "chief" in os.environ.get("KERASTUNER_TUNER_ID", ""):
            return Role.TUNER_CHIEF
        return Role.TUNER_WORKER
    return Role.MAIN


def make_strategy(strategy):
    """A `tf.distribute.Strategy` from None, "mirrored" or a strategy object."""
    if strategy is None or not isinstance(strategy, str):
        return strategy
    if strategy not in STRATEGIES:
        raise SweepError(
            f"Invalid `strategy`. Expected one of {', '.join(STRATEGIES)}. "
            f"Received: strategy={strategy!r}"
        )
    import tensorflow as tf

    return tf.distribute.MirroredStrategy()


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def trial_name(label: str, seed: int) -> str:
    return f"{label} seed {seed}"


def search_as_trials(
    runs: Sequence[tuple[str, int]],
    train: Callable[[str, int], float],
    out: Path,
) -> None:
    """Trains the runs as the trials of a KerasTuner grid search.

    Alone, this process runs every trial. As a KerasTuner worker it runs the trials the
    chief's oracle gives it; as the chief it only serves them.

    Args:
        runs: (label, seed) of every run.
        train: Trains one run (or returns its earlier result); returns its best
            validation accuracy, the trial's objective.
        out: The sweep's folder; KerasTuner keeps its state under `out/keras_tuner`.
    """
    try:
        import keras_tuner
    except ImportError as err:
        raise SweepError(
            "Cannot run the variants as KerasTuner trials: the keras-tuner package is not "
            "installed. Install it with `pip install keras-tuner`."
        ) from err
    by_name = {trial_name(label, seed): (label, seed) for label, seed in runs}

    class _VariantTrials(keras_tuner.GridSearch):
        def run_trial(self, trial, *args, **kwargs):
            label, seed = by_name[trial.hyperparameters.get("variant")]
            return {"val_accuracy": train(label, seed)}

    space = keras_tuner.HyperParameters()
    space.Choice("variant", list(by_name), ordered=False)
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID", "tuner0")
    tuner = _VariantTrials(
        hyperparameters=space,
        objective=keras_tuner.Objective("val_accuracy", direction="max"),
        max_trials=len(by_name),
        # One folder per tuner: each overwrites only its own state.
        directory=str(out / "keras_tuner"),
        project_name=tuner_id,
        overwrite=True,
    )
    tuner.search(verbose=0)
