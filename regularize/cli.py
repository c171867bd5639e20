"""The `regularize` command: parse, call the API, print, choose the exit code.

Exit codes: 0 done, 1 the model cannot be processed (or could not be written),
2 bad arguments. Every error is one line on stderr; `--debug` shows the
traceback instead. TensorFlow is imported only once a command runs, so
`--help` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import signal
import sys
import warnings
from pathlib import Path

import click

from regularize import __version__
from regularize import applications
from regularize.errors import ModelLoadError
from regularize.errors import PolicyError
from regularize.errors import RegularizeError
from regularize.policy import validate_rate
from regularize.text import printable
from regularize.text import short_repr


class _OneLineErrors(click.Group):
    """Prints click's usage errors as one line (no usage block), exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as err:
            # Messages quote names from model files: no control sequence reaches the terminal.
            click.echo(f"Error: {printable(err.format_message())}", err=True)
            sys.exit(2)
        except click.ClickException as err:
            click.echo(f"Error: {printable(err.format_message())}", err=True)
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


def _input_shape(ctx, param, value):
    if value is None:
        return None
    try:
        return applications.parse_input_shape(value)
    except ModelLoadError as err:
        raise click.BadParameter(str(err), ctx, param) from err


def check_path(path: Path | None, hint: str, *, follow: bool = True) -> Path | None:
    """`path` if the OS can look it up (or says it is absent); else one line, exit 2.

    `Path.exists()` and friends raise (a traceback) for a name over 255 bytes
    or a path the process may not search, and answer False for a symlink
    loop; this check runs first, before TensorFlow is imported. `follow=False`
    (an output path) looks at a link itself, not where it points.
    """
    if path is None:
        return None
    try:
        (os.stat if follow else os.lstat)(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as err:
        raise click.BadParameter(
            f"Cannot use path: {_path_problem(err)}. Received: {short_repr(str(path), 300)}",
            param_hint=hint,
        ) from None
    return path


def _path_problem(err: OSError) -> str:
    """What is wrong with a path the OS refused to look up, and what was expected."""
    if err.errno == errno.ENAMETOOLONG:
        return (
            "a name in it is longer than the file system allows. "
            "Expected names of at most 255 bytes"
        )
    if err.errno == errno.ELOOP:
        return "it is a symlink loop. Expected a file, a folder or a link to one"
    reason = (err.strerror or type(err).__name__).lower()
    return f"{reason}. Expected a path this user may look up"


def path_callback(hint: str, *, follow: bool = True):
    """A click callback running `check_path` on the option's value."""
    return lambda ctx, param, value: check_path(value, hint, follow=follow)


def _options(*options):
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


_input_options = _options(
    click.argument(
        "input",
        metavar="INPUT",
        type=click.Path(path_type=Path),
        callback=path_callback("'INPUT'"),
    ),
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
    click.option(
        "--weights",
        metavar="imagenet|none|PATH",
        help="For INPUT keras.applications.NAME: ImageNet weights (the default, "
        "downloaded once into ~/.keras), none (random), or a local weights file.",
    ),
    click.option(
        "--no-top",
        is_flag=True,
        help="For INPUT keras.applications.NAME: leave out the classifier at the top.",
    ),
    click.option(
        "--input-shape",
        metavar="H,W,C",
        callback=_input_shape,
        help="For INPUT keras.applications.NAME: the input size, e.g. 224,224,3.",
    ),
    click.option(
        "--classes",
        type=click.IntRange(min=1),
        help="For INPUT keras.applications.NAME: classes of the top (default 1000).",
    ),
    click.option("-q", "--quiet", is_flag=True, help="No progress display."),
    click.option("--debug", is_flag=True, help="Show tracebacks and library logs."),
)
APPLICATION_FLAGS = {
    "weights": "--weights",
    "no_top": "--no-top",
    "input_shape": "--input-shape",
    "classes": "--classes",
}
_output_options = _options(
    click.option(
        "-o",
        "--output",
        type=click.Path(path_type=Path),
        callback=path_callback("'-o' / '--output'", follow=False),
        help="Where to write the new model (.keras or .h5; a folder for a SavedModel). "
        "Default: next to INPUT, named INPUT_<suffix>.keras (Keras 2 inputs: "
        "INPUT_<suffix>.h5 or INPUT_<suffix>/, as the input).",
    ),
    click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists."),
    click.option(
        "--to-keras3",
        is_flag=True,
        help="Keras 2 input (SavedModel, tfmot, TFOpLambda ...): write a Keras 3 "
        ".keras file instead of a Keras 2 one, after checking its inference.",
    ),
    click.option("--dry-run", is_flag=True, help="Print the plan; write nothing."),
    click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
)
_policy_options = _options(
    click.option(
        "--policy",
        "policy_file",
        type=click.Path(path_type=Path),
        callback=path_callback("'--policy'"),
        help="TOML policy file (preset, rules, schedule). It wins for what it "
        "states; --rate and --recurrent-rate fill in the rest.",
    ),
    click.option(
        "--preset",
        type=click.Choice(["all", "head", "blocks"]),
        default=None,
        help="Where dropout goes: after every activation (all, the default), only "
        "in the classifier head (head), or at block outputs (blocks).",
    ),
    click.option(
        "--rate", type=RATE, default=0.3, show_default=True, help="Dropout rate in [0, 1)."
    ),
    click.option(
        "--recurrent-rate",
        type=RATE,
        default=None,
        help="recurrent_dropout for RNN layers (disables cuDNN on GPU). Default: unchanged.",
    ),
)


def _policy(policy_file, preset, rate, recurrent_rate, mc=False):
    """The policy of a command line, checked before the slow TensorFlow import."""
    from regularize.policy import Policy

    defaults = {"rate": rate, "recurrent_rate": recurrent_rate}
    if preset:
        defaults["preset"] = preset
    if mc:
        defaults["mc"] = True
    try:
        if policy_file is None:
            return Policy(**defaults)
        return Policy.from_file(policy_file, **defaults)
    except PolicyError as err:
        raise click.BadParameter(str(err), param_hint="'--policy'") from err


@cli.command("add-dropout")
@_input_options
@_output_options
@_policy_options
@click.option(
    "--mc",
    is_flag=True,
    help="Monte Carlo dropout: dropout stays active at inference. Loading the "
    "output needs `import regularize`.",
)
def add_dropout_command(policy_file, preset, rate, recurrent_rate, mc, **common):
    """Insert dropout after activations and set RNN dropout.

    Writes a new model ready for fine-tuning: same weights, same names,
    same compile config, and the same predictions at inference.
    """
    policy = _policy(policy_file, preset, rate, recurrent_rate, mc)

    def transform(api, model, report):
        return api.add_dropout(model, policy=policy, report=report)

    _process(transform, "dropout", legacy={"mode": "add", "policy": policy}, **common)


@cli.command("remove-dropout")
@_input_options
@_output_options
def remove_dropout_command(**common):
    """Strip every Dropout-family layer and zero RNN dropout."""

    def transform(api, model, report):
        return api.remove_dropout(model, report=report)

    _process(transform, "nodropout", legacy={"mode": "strip"}, **common)


@cli.command("inspect")
@_input_options
@_policy_options
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
def inspect_command(policy_file, preset, rate, recurrent_rate, as_json, **common):
    """Show every candidate site and what the policy would do there.

    Writes nothing: layer path, class, output shape, depth (0 at the inputs,
    1 at the outputs), dropout already there, and the action with its reason.
    """
    policy = _policy(policy_file, preset, rate, recurrent_rate)

    def transform(api, model, report):
        api.plan(model, policy=policy, report=report)

    report = _run(transform, legacy={"mode": "plan", "policy": policy}, **common)
    _print_warnings(report)
    if as_json:
        data = {"input": str(common["input"]), "policy": policy.to_dict()}
        data.update(report.to_dict())
        click.echo(json.dumps(data, indent=2))
    elif _is_terminal():
        _print_table(report)
    else:
        click.echo(report.render_plan())


def _process(transform, suffix, *, output, force, dry_run, as_json, to_keras3, legacy, **common):
    """Checks the paths, loads, transforms, reports and (unless dry) saves."""
    from regularize import legacy as keras2

    input = common["input"]
    kind = keras2.detect(input)
    given = output is not None
    if output is None and kind:
        output = keras2.default_output(input, suffix, to_keras3=to_keras3)
    elif output is None and _is_application(input):
        # In the working folder: INPUT names no folder.
        output = Path(f"{applications.short_name(input)}_{suffix}.keras")
    elif output is None:
        output = input.with_name(f"{input.stem}_{suffix}.keras")
    if not dry_run:
        # A default output name may pass the 255-byte limit where INPUT's did not.
        hint = "'-o' / '--output'" if given else "the default output (pass -o)"
        check_path(output, hint, follow=False)
        _check_input(input)
        _check_output(input, output, force, keras2=bool(kind), to_keras3=to_keras3)
    save_to = None if dry_run else output
    report = _run(
        transform, save_to=save_to, force=force, legacy=legacy, to_keras3=to_keras3, **common
    )
    _print_warnings(report)
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
        click.echo(printable(f"wrote {output}"))


def _run(
    transform,
    *,
    input,
    custom_objects,
    unsafe,
    quiet,
    debug,
    weights,
    no_top,
    input_shape,
    classes,
    save_to=None,
    force=False,
    legacy=None,
    to_keras3=False,
):
    """Loads INPUT, runs `transform(api, model, report)`, saves; one-line errors.

    Keras 2 inputs (`legacy.detect`) go to the Keras 2 engine instead, with
    `legacy` (the mode and policy) as the request.
    """
    from regularize import legacy as keras2

    _check_input(input)
    flags = {"weights": weights, "no_top": no_top or None, "input_shape": input_shape}
    flags["classes"] = classes
    options = _application_options(input, {k: v for k, v in flags.items() if v is not None})
    signal.signal(signal.SIGTERM, _terminate)
    with one_line_errors(debug):
        if legacy is not None and keras2.detect(input):
            request = dict(legacy, input=input, custom_objects=custom_objects)
            request.update(safe_mode=not unsafe, overwrite=force, to_keras3=to_keras3)
            request.update(output=save_to, dry_run=save_to is None)
            # Keras 3 is needed here only to write a `.keras` file.
            needs_keras = to_keras3 and save_to is not None
            with _quiet(debug) if needs_keras else contextlib.nullcontext():
                with _progress(quiet or debug) as step:
                    step(f"rewriting {input} with the Keras 2 engine")
                    return keras2.to_report(keras2.run(request, debug=debug))
        with _quiet(debug), _progress(quiet or debug) as step:
            step(f"loading {input}")
            from regularize import api
            from regularize import io
            from regularize.report import Report

            if _is_application(input):
                _resolve(input)
            model = io.load_model(
                input, custom_objects=custom_objects, safe_mode=not unsafe, **options
            )
            report = Report()
            step("rewriting")
            new = transform(api, model, report)
            if save_to is not None:
                step(f"writing {save_to}")
                io.save_model(new, save_to, overwrite=force)
    return report


@contextlib.contextmanager
def one_line_errors(debug: bool):
    """Turns what the block raises into one `click.ClickException` line.

    `RegularizeError`s keep their message; anything else is an internal
    error with its first line. With `debug` the exception goes through.
    """
    try:
        yield
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


@contextlib.contextmanager
def _progress(quiet: bool):
    """Yields `step(text)`: a spinner line on a terminal, nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        yield lambda text: None
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(stderr=True)
    # Text, not a string: rich would read markup in a path or name.
    with console.status("starting") as status:
        yield lambda text: status.update(Text(printable(text) + " ..."))


def _is_terminal() -> bool:
    return sys.stdout.isatty()


def _print_warnings(report) -> None:
    for note in report.warnings:
        click.echo(f"Warning: {printable(note)}", err=True)


def _print_table(report) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from regularize.report import COLUMNS

    table = Table(box=None, header_style="bold")
    for column in COLUMNS:
        table.add_column(column.upper(), overflow="fold")
    styles = {"insert": "green", "update": "yellow", "remove": "red", "skip": "dim"}
    # Cells as Text: rich reads a plain string as markup, and a layer named
    # "[link=...]x" or ":warning:" would be rendered, not shown.
    for row in report.rows():
        table.add_row(*(Text(row[c]) for c in COLUMNS), style=styles.get(row["action"]))
    console = Console()
    console.print(table)
    for line in report.summary_lines():
        console.print(Text(line))


def _is_application(input: Path) -> bool:
    return applications.is_application_name(input) and not input.exists()


def _application_options(input: Path, flags: dict) -> dict:
    """`load_model` options from the Application flags; exit 2 where they do not apply."""
    if not _is_application(input):
        if flags:
            raise click.UsageError(
                f"{', '.join(APPLICATION_FLAGS[k] for k in flags)}: only for INPUT "
                f"keras.applications.NAME, not for a model file. Received: INPUT={str(input)!r}"
            )
        return {}
    options = {}
    if "weights" in flags:
        options["weights"] = applications.parse_weights(flags["weights"])
    if "no_top" in flags:
        options["include_top"] = False
    if "input_shape" in flags:
        options["input_shape"] = flags["input_shape"]
    if "classes" in flags:
        options["classes"] = flags["classes"]
    try:
        applications.check_options(**options)
    except ModelLoadError as err:
        raise click.UsageError(str(err)) from err
    return options


def _resolve(input: Path) -> None:
    """An unknown Application name is a bad argument: exit 2, with close matches."""
    try:
        applications.resolve(input)
    except ModelLoadError as err:
        raise click.BadParameter(str(err), param_hint="'INPUT'") from err


def _check_input(input: Path) -> None:
    if not input.exists() and not applications.is_application_name(input):
        raise click.BadParameter(
            "no such file. Expected a `.keras` or `.h5` model or a SavedModel folder. "
            f"Received: {str(input)!r}",
            param_hint="'INPUT'",
        )


def _check_output(
    input: Path, output: Path, force: bool, *, keras2: bool = False, to_keras3: bool = False
) -> None:
    """Fails before the slow TensorFlow import if OUTPUT cannot be written."""
    from regularize import legacy
    from regularize.errors import ModelSaveError
    from regularize.paths import check_output_path

    try:
        if keras2:
            legacy.check_output(input, output, overwrite=force, to_keras3=to_keras3)
        else:
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
        import keras

        # On JAX or PyTorch, Keras still imports TensorFlow if it is installed
        # (its serializer probes for `tf.TensorShape` on every save), later and
        # with the same banner: import it now, while stderr is quiet.
        if keras.backend.backend() != "tensorflow":
            with contextlib.suppress(ImportError):
                importlib.import_module("tensorflow")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _register_commands() -> None:
    # The sweep command lives in its own module; it imports no TensorFlow either.
    from regularize.cli_sweep import sweep

    cli.add_command(sweep)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="regularize")
