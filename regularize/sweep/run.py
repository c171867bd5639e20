"""`run_sweep`: every variant, every seed, from the same weights; then the table, JSON, plot."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from regularize.core import atomic
from regularize.core.errors import PolicyError
from regularize.core.policy import Policy
from regularize.core.rules import validate_rate
from regularize.sweep import distributed
from regularize.sweep import resume
from regularize.sweep import training
from regularize.sweep.data import DataError
from regularize.sweep.data import DataSpec
from regularize.sweep.data import check_data
from regularize.sweep.distributed import Role
from regularize.sweep.errors import SweepError
from regularize.sweep.plot import plot_curves
from regularize.sweep.progress import Display
from regularize.sweep.progress import show_progress
from regularize.sweep.results import SweepResult
from regularize.sweep.results import best_label
from regularize.sweep.variants import DEFAULT_RATES
from regularize.sweep.variants import SAME
from regularize.sweep.variants import Variant
from regularize.sweep.variants import check_sweep_policy
from regularize.sweep.variants import variants_from


def run_sweep(
    model,
    data: str | os.PathLike,
    variants: Sequence[float] | Sequence[Variant] = DEFAULT_RATES,
    *,
    epochs: int,
    policy: Policy | str | os.PathLike | None = None,
    recurrent_rate: float | str | None = None,
    seeds: int | Sequence[int] = 0,
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    validation_split: float = 0.2,
    image_size: tuple[int, int] | None = None,
    save_best: str | os.PathLike | None = None,
    overwrite: bool = False,
    strategy=None,
    keras_tuner: bool = False,
    progress: bool | None = None,
    custom_objects=None,
    safe_mode: bool = True,
) -> SweepResult:
    """Fine-tunes every variant of `model` with every seed and compares them.

    Every variant starts from the same weights (the model's), is rewritten with
    `add_dropout` under its policy, compiled like the model (or with the default below)
    and fine-tuned, for each seed, with that seed and that seed's batch order. The input
    model is left as it was.

    If the model is not compiled, the variants are compiled with `Adam(1e-3)`, sparse
    categorical cross-entropy (categorical for one-hot labels, binary for one output unit;
    `from_logits` unless the output layer ends in softmax / sigmoid) and accuracy. An
    accuracy metric is added to a compile config that has none.

    Args:
        model: A `keras.Model`, or the path of a `.keras` / `.h5` file. With a `strategy`,
            a model object must have been built in its scope (a file is loaded there).
        data: An image folder (one subfolder per class, split by seed with
            `validation_split`) or an `.npz` file with x_train, y_train, x_val, y_val.
        variants: Dropout rates in [0, 1) (0, the baseline, is added if absent), or
            `Variant`s (see `policy_variants`, `rate_variants`, `setting_variants`), one
            of them the baseline.
        epochs: Epochs per variant.
        policy: With rates: a `Policy` or a TOML policy file that each variant uses with
            its own `rate` (rules with a rate of their own keep it).
        recurrent_rate: `recurrent_dropout` of RNN layers: a float, "same" (the variant's
            rate), or None (unchanged).
        seeds: A seed or several: each seeds weights of new layers, dropout masks, batch
            order and the folder split of its runs. With several, the table gives
            mean ± std and each variant's paired difference to the baseline.
        out: Output folder. Default: `<model file stem>_sweep` next to the model file, or
            `<model name>_sweep` in the working folder. A failed sweep leaves no empty
            folder.
        batch_size: Global batch size.
        validation_split: Fraction of an image folder used for validation.
        image_size: (height, width) to read a folder at; default: the model's input size.
        save_best: Also write the best variant (its run with the first seed) here,
            atomically.
        overwrite: Replace an existing `save_best` file.
        strategy: None, "mirrored" (every GPU of this machine), or a
            `tf.distribute.Strategy`.
        keras_tuner: Run the variants as KerasTuner trials; with KerasTuner's environment
            variables set, this process is the chief or a worker of a distributed search
            (see `regularize.sweep.distributed`). Needs the keras-tuner package.
        progress: Show a progress display; default: when stderr is a TTY.
        custom_objects: For loading `model` from a file (see `load_model`).
        safe_mode: For loading `model` from a file (see `load_model`).

    Returns:
        A `SweepResult`; `results.json` and `curves.png` are in `out`.

    Raises:
        PolicyError: A rate, policy or variant is invalid.
        DataError: The data cannot be read or does not fit the model.
        SweepError: `out` holds results of a different sweep, or is a file.
        ModelLoadError, ModelSaveError, UnsupportedModelError: As in `load_model`,
            `save_model` and `add_dropout`.

    Example:
        >>> from regularize.sweep import run_sweep
        >>> result = run_sweep("cnn.keras", "digits/", [0.2, 0.5], epochs=20, seeds=[0, 1, 2])
        >>> print(result.table())
    """
    recurrent_rate = _check_recurrent_rate(recurrent_rate)
    chosen, notes = variants_from(variants, _base_policy(policy))
    for variant in chosen:
        variant.policy_for(recurrent_rate)  # every policy valid before any training
    seeds = _check_seeds(seeds)
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    kind = check_data(data)
    if kind == "folder" and not 0.0 < validation_split < 1.0:
        raise DataError(
            "Invalid `validation_split`. Expected a float in (0, 1) to split an image "
            f"folder. Received: validation_split={validation_split!r}"
        )
    if save_best is not None:
        from regularize.core.paths import check_output_path

        check_output_path(Path(save_best), overwrite=overwrite)
    out = resume.output_folder(model, out)
    with resume.keeping_no_empty_folder(out):
        return _run(
            model=model,
            data=data,
            kind=kind,
            variants=chosen,
            notes=notes,
            epochs=int(epochs),
            recurrent_rate=recurrent_rate,
            seeds=seeds,
            out=out,
            batch_size=int(batch_size),
            validation_split=validation_split,
            image_size=image_size,
            save_best=save_best,
            overwrite=overwrite,
            strategy=strategy,
            keras_tuner=keras_tuner,
            progress=progress,
            custom_objects=custom_objects,
            safe_mode=safe_mode,
        )


def _run(*, model, data, kind, variants, notes, seeds, out, progress, **options) -> SweepResult:
    strategy = distributed.make_strategy(options["strategy"])
    role = distributed.role_of(strategy, options["keras_tuner"])
    if role == Role.REPLICA:
        write_dir = Path(tempfile.mkdtemp(prefix="regularize-sweep-"))
    else:
        write_dir = out
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        if isinstance(model, (str, os.PathLike)):
            from regularize.keras3.io import load_model

            model = load_model(
                model, custom_objects=options["custom_objects"], safe_mode=options["safe_mode"]
            )
        spec = DataSpec.read(
            data,
            kind,
            model,
            options["batch_size"],
            options["validation_split"],
            options["image_size"],
        )
        compile_config, compile_note = training.compile_config(model, spec)
        run = training.Run(
            model=model,
            spec=spec,
            compile_config=compile_config,
            recurrent_rate=options["recurrent_rate"],
            epochs=options["epochs"],
            write_dir=write_dir,
            strategy=None if strategy is None else type(strategy).__name__,
        )
        settings = run.settings()
        done = resume.finished(out, variants, seeds, settings)
        if done:
            notes.append(
                f"resumed {len(done)} finished run{'s' if len(done) != 1 else ''} from {out} "
                f"({', '.join(_name(key, seeds) for key in done)})"
            )
        before = set(done)
        done = _train_all(run, variants, seeds, settings, done, out, role, progress, options)
    runs = [(v.label, s) for v in variants for s in seeds]
    if role == Role.TUNER_CHIEF:
        done = _collect(out, variants, seeds, settings, before)
        notes.append("KerasTuner chief: the workers trained the variants")
    results = [done[key] for key in runs if key in done]
    labels = [v.label for v in variants]
    result = SweepResult(
        variants=results,
        labels=labels,
        seeds=list(seeds),
        best_label=best_label(results, labels) if results else None,
        out=out,
        compile_note=compile_note,
        notes=notes,
        settings={**settings, "variants": [v.describe() for v in variants], "seeds": seeds},
    )
    if role == Role.REPLICA:
        shutil.rmtree(write_dir, ignore_errors=True)
    elif role == Role.TUNER_WORKER:
        trained = [_name((v.label, v.seed), seeds) for v in results if not v.resumed]
        notes.append(
            f"KerasTuner worker: trained {', '.join(trained) or '(none)'}; "
            "the chief writes the results"
        )
    else:
        _write(result, model, options)
    return result


def _train_all(run, variants, seeds, settings, done, out, role, progress, options) -> dict:
    """Trains every run without a result in `done`; returns `done` completed."""
    by_label = {v.label: v for v in variants}
    runs = [(v.label, s) for v in variants for s in seeds]
    start = training.variables(run.model)
    show = show_progress(progress) and role != Role.TUNER_CHIEF
    try:
        with Display(show, runs, options["epochs"]) as display:
            for key in runs:
                if key in done:
                    display.resumed(key, done[key].best_val_accuracy)

            def train(label: str, seed: int) -> float:
                if (label, seed) not in done:
                    done[label, seed] = training.train_variant(
                        run, by_label[label], seed, start, display, settings
                    )
                return done[label, seed].best_val_accuracy

            if options["keras_tuner"]:
                distributed.search_as_trials(runs, train, out)
            else:
                for label, seed in runs:
                    train(label, seed)
    finally:
        training.assign(run.model, start)
    return done


def _collect(out, variants, seeds, settings, before) -> dict:
    """The KerasTuner chief's view of the runs the workers wrote to `out`."""
    done = resume.finished(out, variants, seeds, settings)
    missing = [
        _name((v.label, s), seeds) for v in variants for s in seeds if (v.label, s) not in done
    ]
    if missing:
        raise SweepError(
            f"The KerasTuner search ended without variant(s) {', '.join(missing)} in "
            f"{str(out)!r}. Expected every worker to write to that folder: give them all "
            "the same `out` on a shared file system."
        )
    for key, variant in done.items():
        variant.resumed = key in before
    return done


def _write(result: SweepResult, model, options) -> None:
    """results.json, curves.png and the best variant, if asked."""
    if options["save_best"] is not None:
        from regularize.keras3.io import load_model
        from regularize.keras3.io import save_model

        source = result.out / result.best.model_file
        best = load_model(
            source, custom_objects=options["custom_objects"], safe_mode=options["safe_mode"]
        )
        result.best_model = save_model(
            best, Path(options["save_best"]), overwrite=options["overwrite"]
        )
    atomic.write_json(result.results_path, result.to_dict())
    seeds = result.seeds
    what = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean ± std over {len(seeds)} seeds"
    plot_curves(
        {label: [v.history for v in result.runs(label)] for label in result.labels},
        result.plot_path,
        title=f"{model.name}: dropout sweep ({what})",
    )
    result.written = True


def _name(key: tuple[str, int], seeds: Sequence[int]) -> str:
    label, seed = key
    return label if len(seeds) == 1 else f"{label} seed {seed}"


# -- checks ---------------------------------------------------------------------


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SweepError(f"Invalid `{name}`. Expected an int >= 1. Received: {name}={value!r}")


def _check_seeds(seeds) -> list[int]:
    listed = [seeds] if not isinstance(seeds, Sequence) else list(seeds)
    bad = [s for s in listed if isinstance(s, bool) or not isinstance(s, (int, np.integer))]
    if not listed or bad or min(listed) < 0 or len(set(listed)) != len(listed):
        raise SweepError(
            "Invalid `seeds`. Expected an int >= 0 or a list of distinct ones. "
            f"Received: seeds={seeds!r}",
            argument="seeds",
        )
    return [int(s) for s in listed]


def _check_recurrent_rate(value):
    if value is None or value == SAME:
        return value
    return validate_rate("recurrent_rate", value)


def _base_policy(policy) -> Policy | None:
    if policy is None:
        return None
    if isinstance(policy, (str, os.PathLike)):
        policy = Policy.from_file(policy)
    if not isinstance(policy, Policy):
        raise PolicyError(
            "Invalid `policy`. Expected a `regularize.Policy` or the path of a TOML "
            f"policy file. Received: policy of type {type(policy).__name__!r}"
        )
    return check_sweep_policy(policy)
