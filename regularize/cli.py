"""The `regularize` command: parse, call the API, print, choose the exit code.

Exit codes: 0 done, 1 the model cannot be processed (or could not be written),
2 bad arguments, 3 the policy puts dropout nowhere (nothing written, unless
`--allow-empty`), 130 interrupted (Ctrl-C; 143 for SIGTERM). Every error is
one line on stderr; `--debug` shows the traceback instead. TensorFlow is
imported only once a command runs and its arguments passed every check that
needs no TensorFlow, so `--help` and bad arguments stay fast; on a terminal a
progress line shows what the wait is for from the start.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import click

from regularize import __version__
from regularize import applications
from regularize.errors import ModelLoadError
from regularize.errors import PolicyError
from regularize.errors import RegularizeError
from regularize.policy import validate_rate
from regularize.rules import INFERENCE_ONLY
from regularize.text import printable
from regularize.text import short_repr

EXIT_EMPTY = 3  # the policy puts dropout nowhere


class Interrupted(click.ClickException):
    """Ctrl-C or SIGTERM: one line without "Error:", exit 128 + the signal number.

    Args:
        note: What the run left, e.g. "nothing written" or "after writing 'x'".
        signum: SIGINT (Ctrl-C) or SIGTERM.
    """

    def __init__(self, note: str = ": nothing written", signum: int = signal.SIGINT):
        word = "terminated" if signum == signal.SIGTERM else "interrupted"
        super().__init__(printable(word + note))
        self.exit_code = 128 + signum


class _Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so that every temporary file is removed."""


def _signal_of(err: BaseException) -> int:
    return signal.SIGTERM if isinstance(err, _Terminated) else signal.SIGINT


class NoDropout(click.ClickException):
    """The policy puts dropout nowhere; `--allow-empty` accepts that."""

    exit_code = EXIT_EMPTY


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
        except Interrupted as err:
            click.echo(err.format_message(), err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"Error: {printable(err.format_message())}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:  # Ctrl-C while click itself parsed the arguments
            click.echo(Interrupted().format_message(), err=True)
            sys.exit(128 + signal.SIGINT)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        # Before click's own handler turns it into an empty line and "Aborted.".
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:
            raise Interrupted(signum=_signal_of(err)) from None


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


def _input_callback(ctx, param, value):
    return _check_input(check_path(value, "'INPUT'"))


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
        callback=_input_callback,
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
_allow_empty_option = click.option(
    "--allow-empty",
    is_flag=True,
    help="Accept a policy that puts dropout nowhere: exit 0 (and write the model) "
    "instead of exit 3 with nothing written.",
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
    click.option(
        "--attention-rate",
        type=RATE,
        default=None,
        help="Dropout on attention probabilities (MultiHeadAttention, attention_dropout "
        "keys; disables fused attention on GPU). Default: unchanged.",
    ),
)


def _policy(policy_file, preset, rate, recurrent_rate, attention_rate=None, mc=False):
    """The policy of a command line, checked before the slow TensorFlow import."""
    from regularize.policy import Policy

    defaults = {"rate": rate, "recurrent_rate": recurrent_rate, "attention_rate": attention_rate}
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
@_allow_empty_option
def add_dropout_command(
    policy_file, preset, rate, recurrent_rate, attention_rate, mc, allow_empty, **common
):
    """Insert dropout after activations and set RNN dropout.

    Writes a new model ready for fine-tuning: same weights, same names,
    same compile config, and the same predictions at inference. If the
    policy puts dropout nowhere, exits 3 and writes nothing (unless
    --allow-empty).
    """
    policy = _policy(policy_file, preset, rate, recurrent_rate, attention_rate, mc)

    def transform(api, model, report):
        return api.add_dropout(model, policy=policy, report=report)

    legacy = {"mode": "add", "policy": policy}
    empty = _EmptyCheck(policy, allow_empty)
    _process(transform, "dropout", legacy=legacy, empty=empty, **common)


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
@_allow_empty_option
def inspect_command(
    policy_file, preset, rate, recurrent_rate, attention_rate, as_json, allow_empty, **common
):
    """Show every candidate site and what the policy would do there.

    Writes nothing: layer path, class, output shape, depth (0 at the inputs,
    1 at the outputs), dropout already there, and the action with its reason.
    Exits 3 if the policy would put dropout nowhere (unless --allow-empty).
    """
    policy = _policy(policy_file, preset, rate, recurrent_rate, attention_rate)
    empty = _EmptyCheck(policy, allow_empty)

    def transform(api, model, report):
        api.plan(model, policy=policy, report=report)

    with _interrupts():
        with _progress(common["quiet"] or common["debug"]) as step:
            report = _run(transform, step, legacy={"mode": "plan", "policy": policy}, **common)
        _print_warnings(report)
        if as_json:
            data = {"input": str(common["input"]), "policy": policy.to_dict()}
            data.update(report.to_dict())
            click.echo(_json(data))
        elif _is_terminal():
            _print_table(report)
        else:
            click.echo(report.render_plan())
    empty.conclude(report, planned=True)


def _process(
    transform,
    suffix,
    *,
    output,
    force,
    dry_run,
    as_json,
    to_keras3,
    legacy,
    empty=None,
    **common,
):
    """Checks the paths, loads, transforms, reports and (unless dry) saves."""
    input = common["input"]
    empty = empty or _EmptyCheck(None, True)
    with _interrupts() as guard:
        with _progress(common["quiet"] or common["debug"]) as step:
            # Imported here, not at the top: h5py and this module's checks are
            # part of the time the progress line accounts for.
            from regularize import legacy as keras2

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
                hint = OUTPUT_HINT if given else DEFAULT_OUTPUT_HINT
                check_path(output, hint, follow=False)
                _check_output(input, output, force, hint, keras2=bool(kind), to_keras3=to_keras3)
            save_to = None if dry_run else output
            guard.watch(save_to)
            report = _run(
                transform,
                step,
                save_to=save_to,
                force=force,
                legacy=legacy,
                to_keras3=to_keras3,
                keep=empty.keep,
                **common,
            )
        written = save_to is not None and empty.keep(report)
        _print_warnings(report)
        if as_json:
            data = {"input": str(input), "output": str(output) if written else None}
            data.update(report.to_dict())
            click.echo(_json(data))
        elif dry_run:
            click.echo(report.render_plan())
            click.echo("dry run: nothing written")
        else:
            for line in report.summary_lines():
                click.echo(line)
            if written:
                click.echo(printable(f"wrote {output}"))
    empty.conclude(report, planned=dry_run)


def _run(
    transform,
    step,
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
    keep=None,
):
    """Loads INPUT, runs `transform(api, model, report)`, saves; one-line errors.

    `step(text)` shows what runs now. The model is saved only if
    `keep(report)` (default: always). Keras 2 inputs (`legacy.detect`) go to
    the Keras 2 engine instead, with `legacy` (the mode and policy) as the
    request.
    """
    from regularize import legacy as keras2

    flags = {"weights": weights, "no_top": no_top or None, "input_shape": input_shape}
    flags["classes"] = classes
    options = _application_options(input, {k: v for k, v in flags.items() if v is not None})
    signal.signal(signal.SIGTERM, _terminate)
    keep = keep or (lambda report: True)
    with one_line_errors(debug):
        if legacy is not None and keras2.detect(input):
            request = dict(legacy, input=input, custom_objects=custom_objects)
            request.update(safe_mode=not unsafe, overwrite=force, to_keras3=to_keras3)
            request.update(output=save_to, dry_run=save_to is None)
            # Keras 3 is needed here only to write a `.keras` file.
            needs_keras = to_keras3 and save_to is not None
            step(f"rewriting {input} with the Keras 2 engine")
            with _quiet(debug) if needs_keras else contextlib.nullcontext():
                return _run_keras2(request, keep, debug=debug)
        if not _is_application(input):
            from regularize import inputs

            inputs.check_readable(input)  # a wrong file is said before the slow import
        step("importing TensorFlow")
        with _quiet(debug):
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
            if save_to is not None and keep(report):
                step(f"writing {save_to}")
                io.save_model(new, save_to, overwrite=force)
    return report


def _run_keras2(request: dict, keep, *, debug: bool):
    """One request to the Keras 2 engine; its output is published only if `keep(report)`.

    The engine writes into a temporary folder beside the output, and the
    result is renamed into place here: a policy that puts dropout nowhere, or
    an interrupt, leaves the output as it was.
    """
    from regularize import legacy as keras2

    output = request["output"]
    if output is None:
        return keras2.to_report(_keras2_run(request, debug))
    output = Path(output)
    prefix = f".{output.name[:100]}."
    stage = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=output.parent))
    try:
        staged = stage / output.name
        report = keras2.to_report(_keras2_run(dict(request, output=staged), debug))
        if keep(report):
            _publish(staged, output)
        return report
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _keras2_run(request: dict, debug: bool) -> dict:
    from regularize import legacy as keras2
    from regularize.errors import UnsupportedModelError

    try:
        return keras2.run(request, debug=debug)
    except UnsupportedModelError as err:
        # The library names the argument (`to_keras3`); the flag is the CLI's.
        text = str(err)
        if request.get("to_keras3") and "--to-keras3" not in text and "Keras 3" in text:
            hint = "Drop --to-keras3 to write a Keras 2 model."
            raise UnsupportedModelError(f"{text} {hint}") from err
        raise


def _publish(staged: Path, output: Path) -> None:
    """Renames the engine's finished output into place (a SavedModel folder too)."""
    from regularize import atomic

    if staged.is_dir() and not staged.is_symlink():
        # A folder cannot replace another in one step; `write_folder` moves
        # the old one aside and back on failure. Its empty temporary folder
        # is replaced by the staged one in one rename.
        atomic.write_folder(output, lambda tmp: os.rename(staged, tmp))
    else:
        os.replace(staged, output)


class _EmptyCheck:
    """Whether a report counts as "no dropout anywhere", and what to say then.

    Only a policy that asks for dropout can come out empty: `--rate 0`
    (removing the tool's dropout) is not. A rerun that keeps the tool's
    layers at their rate is not empty either (`Report.with_dropout`).
    """

    def __init__(self, policy, allow: bool):
        self.asks = policy is not None and _asks_for_dropout(policy)
        self.allow = allow

    def is_empty(self, report) -> bool:
        return self.asks and report.with_dropout() == 0

    def keep(self, report) -> bool:
        """Whether to write the model of `report`."""
        return self.allow or not self.is_empty(report)

    def conclude(self, report, *, planned: bool) -> None:
        """Says so on stderr if `report` is empty: a warning, or exit 3."""
        if not self.is_empty(report):
            return
        text = _no_dropout_message(report, planned)
        if self.allow:
            click.echo(f"Warning: {printable(text)}", err=True)
            return
        if planned:
            raise NoDropout(f"{text} Pass --allow-empty to accept that.")
        raise NoDropout(f"{text} Nothing written; pass --allow-empty to write the model anyway.")


def _asks_for_dropout(policy) -> bool:
    """Whether `policy` sets a rate above 0 anywhere (not so for `--rate 0`)."""
    rates = [policy.rate, policy.recurrent_rate, policy.attention_rate, *(policy.schedule or ())]
    for rule in policy.rules:
        rates += [rule.rate, rule.recurrent_rate, rule.attention_rate]
    return any(rate for rate in rates if rate is not None)


# The most common reason a site got no dropout -> what to do about it.
_EMPTY_ADVICE = (
    (
        "preset head:",
        "The head preset puts dropout only after the last normalization layer, and "
        "this model has nothing there: a base without its top gets its head in your "
        "own code, so rewrite the model after adding the head, or use --preset blocks.",
    ),
    (
        "preset blocks:",
        "The blocks preset puts dropout only at block outputs (after a residual Add or "
        "a Concatenate), and this model has none: use --preset all or --preset head.",
    ),
    (
        "already followed by",
        'Dropout the model already has is kept as it is: set existing = "retarget" '
        "in a --policy file to give it the policy's rate.",
    ),
    (
        INFERENCE_ONLY,
        "A nested model called with training=False stays in inference mode: rewrite "
        "the nested model itself, or set skip_inference_only = false in a --policy file.",
    ),
    ("skipped by rule", "The --policy file's rules skip these sites."),
    (
        "feeds BatchNormalization",
        "Dropout never goes directly before a BatchNormalization layer (it would shift "
        "the variance that layer learned): use --preset blocks, or rules for other layers.",
    ),
)


def _no_dropout_message(report, planned: bool) -> str:
    from collections import Counter

    verb = "would insert" if planned else "inserted"
    reasons = Counter(site.reason for site in report.sites)
    if not reasons:
        return (
            f"The policy {verb} no dropout: the model has no candidate site (no "
            "activation and no recurrent layer to put dropout after)."
        )
    parts = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    total = len(report.sites)
    sites = "the only candidate site" if total == 1 else f"all {total} candidate sites"
    what = f"The policy {verb} no dropout: it leaves out {sites} ({parts})."
    main = [r for r, _ in reasons.most_common() if r != "model output"]
    for prefix, advice in _EMPTY_ADVICE:
        if main and main[0].startswith(prefix):
            return f"{what} {advice}"
    return f"{what} Choose another --preset, or a --policy file with rules that set a rate."


OUTPUT_HINT = "'-o' / '--output'"
DEFAULT_OUTPUT_HINT = "the default output (pass -o)"


class _Guard:
    """The output a run may write, and what was at its path before."""

    def __init__(self):
        self.output: Path | None = None
        self.before = None

    def watch(self, output: Path | None) -> None:
        self.output = output
        self.before = _identity(output)


@contextlib.contextmanager
def _interrupts():
    """Turns Ctrl-C (and SIGTERM) into one `Interrupted` line that says what was written.

    Yields a `_Guard`: the output it watches was written if it changed since
    (a rename gives it a new inode); the saves are atomic, so it is then
    whole. Temporary files this process left beside it are removed.
    """
    guard = _Guard()
    try:
        yield guard
    except KeyboardInterrupt as err:
        signum = _signal_of(err)
        previous = signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C waits for the cleanup
        try:
            _remove_own_temps(guard.output)
        finally:
            signal.signal(signum, previous)
        output = guard.output
        changed = output is not None and _identity(output) not in (guard.before, None)
        note = f" after writing {output}" if changed else ": nothing written"
        raise Interrupted(note, signum) from None


def _identity(path: Path | None):
    if path is None:
        return None
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns)


def _remove_own_temps(output: Path | None) -> None:
    """Removes this process's temporary files for `output` (atomic saves remove
    their own; this covers an interrupt between creating one and guarding it)."""
    if output is None:
        return
    from regularize import atomic

    pattern = atomic.temp_pattern(output)
    with contextlib.suppress(OSError):
        for entry in os.scandir(output.parent):
            match = pattern.fullmatch(entry.name)
            if match and int(match.group(1)) == os.getpid():
                atomic.remove(Path(entry.path))


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
def _progress(quiet: bool, first: str = "starting"):
    """Yields `step(text)`: on a terminal, a spinner line with the text and the time
    since the start; nothing otherwise, or when `quiet`.

    The line is drawn through a duplicate of stderr's descriptor, so it keeps
    turning while `import_keras_quietly` points descriptor 2 at /dev/null. It
    is erased when the block ends, before anything else is printed.
    """
    if quiet or not sys.stderr.isatty():
        yield lambda text: None
        return
    with _terminal_stream() as stream:
        spinner = _Spinner(stream, first)
        try:
            yield spinner.update
        finally:
            spinner.close()


class _Spinner:
    """One self-redrawing line: a spinner, a text and the elapsed time.

    Hand-made rather than rich's: importing rich.progress costs about a
    third of the 0.3 s the first output may take (issue 13).
    """

    def __init__(self, stream, text: str):
        self.stream = stream
        self.text = printable(text)
        self.started = time.monotonic()
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        self.frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if encoding == "utf8" else "|/-\\"
        self.turn = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self._draw()
        self.thread = threading.Thread(target=self._spin, name="regularize-progress", daemon=True)
        self.thread.start()

    def update(self, text: str) -> None:
        with self.lock:
            self.text = printable(text)
            self._draw()

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        with contextlib.suppress(OSError, ValueError):
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def _spin(self) -> None:
        while not self.done.wait(0.1):
            with self.lock:
                self.turn += 1
                self._draw()

    def _draw(self) -> None:
        seconds = int(time.monotonic() - self.started)
        frame = self.frames[self.turn % len(self.frames)]
        line = f"{frame} {self.text} ... {seconds // 60}:{seconds % 60:02d}"
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            width = 0
        width = width or 80  # a terminal that does not know its size says 0
        with contextlib.suppress(OSError, ValueError):
            # One row, whatever the width: "\r" and erase-line reach only the cursor's row.
            self.stream.write("\r\x1b[2K" + line[: max(width - 1, 1)])
            self.stream.flush()


@contextlib.contextmanager
def _terminal_stream():
    """A text stream on a duplicate of stderr's file descriptor (stderr itself if it has none)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: a test's stream
        yield sys.stderr
        return
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    stream = os.fdopen(os.dup(fd), "w", encoding=encoding, errors="backslashreplace")
    try:
        yield stream
    finally:
        stream.close()


def _is_terminal() -> bool:
    return sys.stdout.isatty()


def _json(data) -> str:
    """JSON for the terminal: names from the model file escaped as in the tables.

    `json.dumps` writes ESC as `\u001b`, which `jq -r` turns back into a raw
    ESC; `printable` keeps such names inert for any consumer. The Python API
    (`Report.to_dict()`) keeps the names as they are.
    """
    return json.dumps(_escape_strings(data), indent=2)


def _escape_strings(value):
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): _escape_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape_strings(v) for v in value]
    return value


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
    for line in report.summary_lines(planned=True):
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


MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def _check_input(input: Path) -> Path:
    """INPUT if some engine may read it; else one line, exit 2, before TensorFlow is imported.

    What the file holds is the loaders' to judge (exit 1); its name and kind
    are checked here, at once, like a missing file.
    """
    if input.is_dir():
        if (input / "saved_model.pb").is_file():
            return input
        problem = "it is a folder, and not a SavedModel (no `saved_model.pb`)"
    elif input.exists():
        if input.suffix in MODEL_SUFFIXES:
            return input
        problem = f"unsupported file type {input.suffix or '(none)'!r}"
    elif applications.is_application_name(input):
        return input
    else:
        problem = "no such file"
    raise click.BadParameter(
        f"{problem}. Expected a `.keras` or `.h5` model or a SavedModel folder. "
        f"Received: {str(input)!r}",
        param_hint="'INPUT'",
    )


def _check_output(
    input: Path,
    output: Path,
    force: bool,
    hint: str = OUTPUT_HINT,
    *,
    keras2: bool = False,
    to_keras3: bool = False,
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
        raise click.BadParameter(str(err), param_hint=hint) from err


def _terminate(signum, frame):
    # Unwind like Ctrl-C so that the atomic save removes its temporary file.
    raise _Terminated


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
        with _interrupts_held():
            import keras

            # On JAX or PyTorch, Keras still imports TensorFlow if it is
            # installed (its serializer probes for `tf.TensorShape` on every
            # save), later and with the same banner: import it now, while
            # stderr is quiet.
            if keras.backend.backend() != "tensorflow":
                with contextlib.suppress(ImportError):
                    importlib.import_module("tensorflow")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _interrupts_held():
    """Holds Ctrl-C and SIGTERM back until the block ends, then delivers them.

    A KeyboardInterrupt raised inside TensorFlow's import can be swallowed by
    a bare `except:` of some module it imports (the import then finishes, and
    the run goes on as if nothing happened), or leave a half-imported module
    behind. The signal is noted here and raised once the import is done.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in old:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if caught:
        handler = old[caught[0]]
        if callable(handler):
            handler(caught[0], None)
        raise KeyboardInterrupt


def _register_commands() -> None:
    # The sweep command lives in its own module; it imports no TensorFlow either.
    from regularize.cli_sweep import sweep

    cli.add_command(sweep)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="regularize")
