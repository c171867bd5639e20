"""The `regularize` command: parse, call the API, print, choose the exit code.

Exit codes: 0 done, 1 the model cannot be processed (or could not be written),
2 bad arguments. Every error is one line on stderr; `--debug` shows the
traceback instead. TensorFlow is imported only once a command runs, so
`--help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import click

from regularize import __version__
from regularize.errors import PolicyError
from regularize.errors import RegularizeError
from regularize.policy import validate_rate


class _OneLineErrors(click.Group):
    """Prints click's usage errors as one line (no usage block), exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as err:
            click.echo(f"Error: {err.format_message()}", err=True)
            sys.exit(2)
        except click.ClickException as err:
            click.echo(f"Error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class _Rate(click.ParamType):
    name = "RATE"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"Expected a float in [0, 1). Received: {value!r}", param, ctx)
        try:
            return validate_rate(param.name if param else "rate", number)
        except PolicyError:
            self.fail(f"Expected a float in [0, 1). Received: {value!r}", param, ctx)


RATE = _Rate()


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="regularize")
def cli():
    """Add dropout to existing Keras models, keeping every pretrained weight."""


def _model_options(func):
    """Options shared by the commands that read one model and write another."""
    options = [
        click.argument("input", metavar="INPUT", type=click.Path(path_type=Path)),
        click.option(
            "-o",
            "--output",
            type=click.Path(path_type=Path),
            help="Where to write the new model (.keras or .h5). "
            "Default: next to INPUT, named INPUT_<suffix>.keras.",
        ),
        click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists."),
        click.option("--dry-run", is_flag=True, help="Print the plan; write nothing."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
        click.option(
            "--custom-objects",
            metavar="MODULE_OR_FILE",
            help="Module name or .py file defining the model's custom layers.",
        ),
        click.option(
            "--unsafe",
            is_flag=True,
            help="Allow Python-lambda Lambda layers (runs code from the file).",
        ),
        click.option("--debug", is_flag=True, help="Show tracebacks and library logs."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@cli.command("add-dropout")
@_model_options
@click.option("--rate", type=RATE, default=0.3, show_default=True, help="Dropout rate in [0, 1).")
@click.option(
    "--recurrent-rate",
    type=RATE,
    default=None,
    help="recurrent_dropout for RNN layers (disables cuDNN on GPU). Default: unchanged.",
)
def add_dropout_command(rate, recurrent_rate, **common):
    """Insert dropout after activations and set RNN dropout.

    Writes a new model ready for fine-tuning: same weights, same names,
    same compile config, and the same predictions at inference.
    """

    def transform(api, model, report):
        return api.add_dropout(model, rate, recurrent_rate=recurrent_rate, report=report)

    _process(transform, "dropout", **common)


@cli.command("remove-dropout")
@_model_options
def remove_dropout_command(**common):
    """Strip every Dropout-family layer and zero RNN dropout."""

    def transform(api, model, report):
        return api.remove_dropout(model, report=report)

    _process(transform, "nodropout", **common)


def _process(
    transform, suffix, *, input, output, force, dry_run, as_json, custom_objects, unsafe, debug
):
    """Checks the paths, loads, transforms, reports and (unless dry) saves."""
    if not input.exists():
        raise click.BadParameter(
            f"no such file. Expected a `.keras` or `.h5` model. Received: {str(input)!r}",
            param_hint="'INPUT'",
        )
    if output is None:
        output = input.with_name(f"{input.stem}_{suffix}.keras")
    if not dry_run:
        _check_output(input, output, force)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        with _quiet(debug):
            from regularize import api
            from regularize import io
            from regularize.report import Report

            model = io.load_model(input, custom_objects=custom_objects, safe_mode=not unsafe)
            report = Report()
            new = transform(api, model, report)
            if not dry_run:
                io.save_model(new, output, overwrite=force)
    except RegularizeError as err:
        if debug:
            raise
        raise click.ClickException(str(err)) from err
    except (click.ClickException, KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if debug:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        raise click.ClickException(
            f"internal error: {type(err).__name__}: {first} (run again with --debug "
            "for the traceback)"
        ) from err
    for note in report.warnings:
        click.echo(f"Warning: {note}", err=True)
    if as_json:
        data = {"input": str(input), "output": None if dry_run else str(output)}
        data.update(report.to_dict())
        click.echo(json.dumps(data, indent=2))
    elif dry_run:
        click.echo(report.render_plan())
        click.echo("dry run: nothing written")
    else:
        for line in report.summary_lines():
            click.echo(line)
        click.echo(f"wrote {output}")


def _check_output(input: Path, output: Path, force: bool) -> None:
    """Fails before the slow TensorFlow import if OUTPUT cannot be written."""
    from regularize.errors import ModelSaveError
    from regularize.paths import check_output_path

    try:
        check_output_path(output, overwrite=force, source=input)
    except ModelSaveError as err:
        raise click.BadParameter(str(err), param_hint="'-o' / '--output'") from err


def _terminate(signum, frame):
    # Unwind like Ctrl-C so that the atomic save removes its temporary file.
    raise KeyboardInterrupt


@contextlib.contextmanager
def _quiet(debug: bool):
    """Keeps TensorFlow's and Keras' log lines off stderr (unless --debug).

    See `import_keras_quietly`. Python warnings are silenced too: the tool's
    own are in the report and printed from there, one line each.
    """
    if debug:
        yield
        return
    import_keras_quietly()
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def import_keras_quietly() -> None:
    """Imports Keras (and TensorFlow) with stderr pointed at /dev/null meanwhile.

    TensorFlow 2.21 writes INFO lines (oneDNN, CUDA) to file descriptor 2 from
    C++ while it is imported, before absl logging exists, whatever
    TF_CPP_MIN_LOG_LEVEL says.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "keras" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="regularize")
