"""The `regularize sweep` command: fine-tune one variant per dropout rate or policy.

Registered on the main group in `cli.py`. Rates, data and output paths are
checked before TensorFlow is imported, so bad arguments fail at once.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import click

from regularize.cli.options import MODEL_SUFFIXES
from regularize.cli.runtime import Interrupted
from regularize.cli.runtime import _progress
from regularize.cli.runtime import _quiet
from regularize.cli.runtime import _signal_of
from regularize.cli.runtime import _terminate
from regularize.cli.runtime import check_path
from regularize.cli.runtime import import_keras_quietly
from regularize.cli.runtime import one_line_errors


def _path(hint: str, *, follow: bool = True):
    """`check_path` as a callback."""

    def callback(ctx, param, value):

        return check_path(value, hint, follow=follow)

    return callback


def _shown(flag: str, kind, default, text: str):
    """An option whose default `--help` shows."""
    return click.option(flag, type=kind, default=default, show_default=True, help=text)


@click.command("sweep")
@click.argument(
    "model", metavar="MODEL", type=click.Path(path_type=Path), callback=_path("'MODEL'")
)
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    callback=_path("'--data'"),
    help="Image folder (one subfolder per class) or .npz with x_train, y_train, x_val, y_val.",
)
@click.option(
    "--rates",
    default=None,
    help="Comma-separated dropout rates in [0, 1); 0 is the baseline (added if absent). "
    "Default: 0,0.2,0.3,0.5; with --policies, each policy's own rate.",
)
@click.option(
    "--policies",
    metavar="P[@RATE],...",
    help="Sweep over policies: comma-separated presets (none, all, head, blocks) or TOML "
    "policy files, each optionally with its own rate after '@'; the others are crossed with "
    "--rates. 'none' (no dropout added) is the baseline (added if absent).",
)
@click.option(
    "--drop-path",
    "drop_path",
    metavar="RATES",
    help="Also compare drop-path variants: one per comma-separated rate (Policy key "
    "drop_path), no dropout from --rates.",
)
@click.option(
    "--attention-rate",
    "attention_rate",
    metavar="RATES",
    help="Also compare attention-dropout variants: one per comma-separated rate (Policy key "
    "attention_rate).",
)
@click.option("--epochs", required=True, type=click.IntRange(min=1), help="Epochs per variant.")
@click.option(
    "--policy",
    type=click.Path(path_type=Path),
    callback=_path("'--policy'"),
    help="TOML policy file; each rate's variant uses it with its own rate (not with --policies).",
)
@click.option(
    "--recurrent-rate",
    default=None,
    metavar="RATE|same",
    help="recurrent_dropout of RNN layers: a rate, or 'same' as the variant's rate. "
    "Default: unchanged.",
)
@_shown(
    "--seed",
    click.IntRange(min=0),
    0,
    "Seeds new layers, dropout masks, batch order and the folder split.",
)
@click.option(
    "--seeds",
    metavar="S,S,...",
    help="Run every variant once per seed (e.g. 0,1,2,3,4): the table gives mean ± std and "
    "each variant's difference to the baseline, paired by seed, with a 95% interval. "
    "Replaces --seed.",
)
@_shown("--batch-size", click.IntRange(min=1), 32, "Global batch size.")
@_shown(
    "--validation-split",
    click.FloatRange(0, 1, min_open=True, max_open=True),
    0.2,
    "Fraction of an image folder kept for validation (split by --seed).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    callback=_path("'--out'", follow=False),
    help="Results folder; run again with the same folder to resume. "
    "Default: MODEL_sweep/ next to MODEL.",
)
@click.option(
    "--save-best",
    type=click.Path(path_type=Path),
    callback=_path("'--save-best'", follow=False),
    help="Also write the best variant here (.keras or .h5).",
)
@click.option("--force", is_flag=True, help="Overwrite the --save-best file if it exists.")
@_shown(
    "--strategy",
    click.Choice(["none", "mirrored"]),
    "none",
    "mirrored: train each variant on every GPU of this machine (tf.distribute).",
)
@click.option(
    "--keras-tuner",
    is_flag=True,
    help="Run the variants as KerasTuner trials; with KERASTUNER_TUNER_ID, "
    "KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set, this process is the chief "
    "or a worker of a search over several machines (--out on a shared file system).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--custom-objects",
    metavar="MODULE_OR_FILE",
    help="Module name or .py file defining the model's custom layers.",
)
@click.option("--unsafe", is_flag=True, help="Allow Python-lambda Lambda layers.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.option("--debug", is_flag=True, help="Show tracebacks and library logs.")
def sweep(
    model,
    data,
    rates,
    policies,
    drop_path,
    attention_rate,
    epochs,
    policy,
    recurrent_rate,
    seed,
    seeds,
    batch_size,
    validation_split,
    out,
    save_best,
    force,
    strategy,
    keras_tuner,
    as_json,
    custom_objects,
    unsafe,
    quiet,
    debug,
):
    """Fine-tune one variant of MODEL per dropout rate or policy and compare them.

    Every variant starts from MODEL's weights and trains with the same seed
    and batch order; rate 0 (or the policy 'none') is the baseline. Prints a
    table (train and validation accuracy, generalization gap; with --seeds,
    mean ± std and the paired difference to the baseline) with the best
    variant marked, and writes results.json, curves.png and one model per
    variant and seed to --out.
    """
    # The progress line first (on a terminal), then the TensorFlow-free checks:
    # they fail in a fraction of a second, and the line is erased before the error.

    with _progress(quiet or debug) as step:
        # Names, not `from regularize import sweep`: the package may export a
        # `sweep` function under the module's name.
        # The shared command-line plumbing (one-line errors, quiet imports,
        # SIGTERM as Ctrl-C).
        from regularize.core.errors import ModelSaveError
        from regularize.core.errors import PolicyError
        from regularize.core.paths import check_output_path
        from regularize.core.text import printable
        from regularize.sweep import DataError
        from regularize.sweep import SweepError
        from regularize.sweep import check_data
        from regularize.sweep import format_rate
        from regularize.sweep import output_folder
        from regularize.sweep import run_sweep

        problem = None
        if not model.exists():
            problem = "no such file"
        elif model.is_dir():
            problem = "it is a folder"
        elif model.suffix not in MODEL_SUFFIXES:
            problem = f"unsupported file type {model.suffix or '(none)'!r}"
        if problem:
            raise click.BadParameter(
                f"{problem}. Expected a `.keras` or `.h5` model. Received: {str(model)!r}",
                param_hint="'MODEL'",
            )
        recurrent = _recurrent_rate(recurrent_rate)
        if policy is not None:
            from regularize.core.policy import Policy
            from regularize.sweep.variants import check_sweep_policy

            if policies is not None:
                raise click.UsageError(
                    "--policy and --policies cannot be combined: each entry of --policies is "
                    "a policy. Expected one of them."
                )
            try:
                policy = check_sweep_policy(Policy.from_file(policy))
            except PolicyError as err:
                raise click.BadParameter(str(err), param_hint="'--policy'") from err
        variants, policy = _variants(rates, policies, drop_path, attention_rate, policy, recurrent)
        seed_list = _seeds(seed, seeds)
        try:
            check_data(data)
        except DataError as err:
            raise click.BadParameter(str(err), param_hint="'--data'") from err
        if save_best is not None:
            try:
                check_output_path(save_best, overwrite=force, source=model)
            except ModelSaveError as err:
                raise click.BadParameter(str(err), param_hint="'--save-best'") from err

        step("importing TensorFlow")
        signal.signal(signal.SIGTERM, _terminate)
        with one_line_errors(debug):
            if not debug:
                import_keras_quietly()
    try:
        with one_line_errors(debug):
            with _quiet(debug):
                try:
                    result = run_sweep(
                        model,
                        data,
                        variants,
                        epochs=epochs,
                        policy=policy,
                        recurrent_rate=recurrent,
                        seeds=seed_list,
                        out=out,
                        batch_size=batch_size,
                        validation_split=validation_split,
                        save_best=save_best,
                        overwrite=force,
                        strategy=None if strategy == "none" else strategy,
                        keras_tuner=keras_tuner,
                        progress=False if quiet else None,
                        custom_objects=custom_objects,
                        safe_mode=not unsafe,
                    )
                except SweepError as err:
                    if debug or err.argument is None:
                        raise
                    # The library names its argument; the command line names the flag.
                    flag = "--" + err.argument.replace("_", "-")
                    raise click.BadParameter(str(err), param_hint=f"'{flag}'") from err
    except KeyboardInterrupt as err:
        folder = output_folder(model, out)
        kept = sorted(folder.glob("variant-*.json")) if folder.is_dir() else []
        note = ": nothing written"
        if kept:
            note = (
                f": {len(kept)} finished variant{'s' if len(kept) != 1 else ''} kept in "
                f"{folder}; run the same command again to resume"
            )
        raise Interrupted(note, _signal_of(err)) from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    # Notes and paths may quote names from the model file or the command line.
    click.echo(printable(f"compile: {result.compile_note}"))
    for note in result.notes:
        click.echo(printable(f"note: {note}"))
    click.echo(result.table())
    if result.written:
        click.echo(printable(f"wrote {result.results_path} and {result.plot_path}"))
    if result.best_model is not None:
        best = result.best_label
        if best == format_rate(result.best_rate):
            best = f"rate {best}"
        click.echo(printable(f"wrote the best variant ({best}) to {result.best_model}"))


def _recurrent_rate(value: str | None):
    if value is None or value == "same":
        return value
    from regularize.core.errors import PolicyError
    from regularize.core.rules import validate_rate

    try:
        return validate_rate("recurrent_rate", float(value))
    except (ValueError, PolicyError):
        raise click.BadParameter(
            f"Expected a float in [0, 1) or 'same'. Received: {value!r}",
            param_hint="'--recurrent-rate'",
        ) from None


def _variants(rates, policies, drop_path, attention_rate, policy, recurrent):
    """(variants or rates, base policy) as the flags ask, every policy checked first.

    A bad rate, preset, policy file or Policy key is a usage error (exit 2), before the
    TensorFlow import.
    """
    from regularize.core.errors import PolicyError
    from regularize.sweep import variants as v

    hint = "'--rates'"
    try:
        rate_list = None if rates is None else v.parse_rates(rates)
        if policies is None:
            hint = "'--policy'"
            chosen, _ = v.rate_variants(rate_list or v.DEFAULT_RATES, policy)
        else:
            hint = "'--policies'"
            chosen, _ = v.policy_variants(v.parse_policies(policies), rate_list)
        # Further Policy keys, forwarded as they are: `Policy` itself says whether it has them.
        for name, text, flag in (
            ("drop_path", drop_path, "'--drop-path'"),
            ("attention_rate", attention_rate, "'--attention-rate'"),
        ):
            if text is not None:
                hint = flag
                added = v.setting_variants(name, [r for r in v.parse_rates(text) if r > 0])
                for variant in added:
                    variant.policy_for(recurrent)
                chosen += added
        hint = "'--policies'" if policies is not None else "'--rates'"
        chosen = v.check_variants(chosen, recurrent)
    except PolicyError as err:
        raise click.BadParameter(str(err), param_hint=hint) from err
    if policies is None and drop_path is None and attention_rate is None:
        # Rates as rates: the library then says when it adds rate 0.
        return list(rate_list or v.DEFAULT_RATES), policy
    return chosen, None


def _seeds(seed: int, seeds: str | None) -> list[int]:
    if seeds is None:
        return [seed]
    try:
        listed = [int(part) for part in seeds.split(",")]
    except ValueError:
        listed = []
    if not listed or min(listed) < 0 or len(set(listed)) != len(listed):
        raise click.BadParameter(
            f"Expected distinct ints >= 0, comma-separated. Received: {seeds!r}",
            param_hint="'--seeds'",
        )
    return listed
