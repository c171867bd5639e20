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

import signal
import sys

import click

from regularize import __version__
from regularize.cli.options import _allow_empty_option
from regularize.cli.options import _application_options
from regularize.cli.options import _input_options
from regularize.cli.options import _output_options
from regularize.cli.options import _policy
from regularize.cli.options import _policy_options
from regularize.cli.runtime import DEFAULT_OUTPUT_HINT
from regularize.cli.runtime import OUTPUT_HINT
from regularize.cli.runtime import Interrupted
from regularize.cli.runtime import _interrupts
from regularize.cli.runtime import _is_terminal
from regularize.cli.runtime import _json
from regularize.cli.runtime import _progress
from regularize.cli.runtime import _quiet
from regularize.cli.runtime import _signal_of
from regularize.cli.runtime import _terminate
from regularize.cli.runtime import as_flags
from regularize.cli.runtime import check_path
from regularize.cli.runtime import one_line_errors
from regularize.cli.sweep import sweep
from regularize.core.errors import ModelSaveError
from regularize.core.errors import UnsupportedModelError
from regularize.core.terms import INFERENCE_ONLY
from regularize.core.text import printable
from regularize.service import Mode

EXIT_EMPTY = 3  # the policy puts dropout nowhere


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
            click.echo(f"Error: {printable(as_flags(err.format_message()))}", err=True)
            sys.exit(2)
        except Interrupted as err:
            click.echo(err.format_message(), err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"Error: {printable(as_flags(err.format_message()))}", err=True)
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


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="regularize")
def cli():
    """Add dropout to existing Keras models, keeping every pretrained weight."""


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
def add_dropout_command(policy_file, preset, mc, allow_empty, **common):
    """Insert dropout after activations and set RNN dropout.

    Writes a new model ready for fine-tuning: same weights, same names,
    same compile config, and the same predictions at inference. If the
    policy puts dropout nowhere, exits 3 and writes nothing (unless
    --allow-empty).
    """
    policy = _policy(policy_file, preset, common, mc=mc)
    _process(Mode.ADD, policy=policy, allow_empty=allow_empty, **common)


@cli.command("remove-dropout")
@_input_options
@_output_options
def remove_dropout_command(**common):
    """Strip every Dropout-family layer and zero RNN dropout."""
    _process(Mode.STRIP, **common)


@cli.command("inspect")
@_input_options
@_policy_options
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@_allow_empty_option
def inspect_command(policy_file, preset, as_json, allow_empty, **common):
    """Show every candidate site and what the policy would do there.

    Writes nothing: layer path, class, output shape, depth (0 at the inputs,
    1 at the outputs), dropout already there, and the action with its reason.
    Exits 3 if the policy would put dropout nowhere (unless --allow-empty).
    """
    policy = _policy(policy_file, preset, common)
    with _interrupts():
        with _progress(common["quiet"] or common["debug"]) as step:
            outcome = _service(Mode.PLAN, step, policy=policy, allow_empty=allow_empty, **common)
        report = outcome.report
        _print_warnings(report)
        if as_json:
            data = {"input": str(common["input"]), "policy": policy.to_dict()}
            data.update(report.to_dict())
            click.echo(_json(data))
        elif _is_terminal():
            _print_table(report)
        else:
            click.echo(report.render_plan())
    _conclude(outcome, allow_empty, planned=True)


def _process(mode, *, output, force, dry_run, as_json, to_keras3, allow_empty=False, **common):
    """The pre-flight (`service.prepare`), then the job; prints the report and what was written."""
    from regularize import service

    input = common["input"]
    with _interrupts() as guard:
        with _progress(common["quiet"] or common["debug"]) as step:
            hint = OUTPUT_HINT if output is not None else DEFAULT_OUTPUT_HINT
            try:
                job = service.prepare(
                    input,
                    mode,
                    output=output,
                    dry_run=dry_run,
                    overwrite=force,
                    to_keras3=to_keras3,
                    # A default output name may pass the 255-byte limit where INPUT's did not.
                    check_name=lambda path: check_path(path, hint, follow=False),
                )
            except ModelSaveError as err:
                raise click.BadParameter(str(err), param_hint=hint) from err
            output = job.output
            guard.watch(output if job.write else None)
            outcome = _service(mode, step, job=job, allow_empty=allow_empty, **common)
        report = outcome.report
        _print_warnings(report)
        if as_json:
            data = {"input": str(input), "output": str(output) if outcome.written else None}
            data.update(report.to_dict())
            click.echo(_json(data))
        elif dry_run:
            click.echo(report.render_plan())
            click.echo("dry run: nothing written")
        else:
            for line in report.summary_lines():
                click.echo(line)
            if outcome.written:
                click.echo(printable(f"wrote {output}"))
    _conclude(outcome, allow_empty, planned=dry_run)


def _service(
    mode,
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
    job=None,
    **kwargs,
):
    """`service.execute` with the command line's flags; its errors as one line each.

    `job` is the pre-flight's (`service.prepare`); a plan makes its own.
    """
    from regularize import service
    from regularize.core.errors import UnknownApplicationError

    flags = {"weights": weights, "no_top": no_top or None, "input_shape": input_shape}
    flags["classes"] = classes
    options = _application_options(input, {k: v for k, v in flags.items() if v is not None})
    signal.signal(signal.SIGTERM, _terminate)
    with one_line_errors(debug):
        try:
            job = job or service.prepare(input, mode)
            return service.execute(
                job,
                custom_objects=custom_objects,
                safe_mode=not unsafe,
                step=step,
                quiet=lambda: _quiet(debug),
                debug=debug,
                **options,
                **kwargs,
            )
        except UnknownApplicationError as err:
            raise click.BadParameter(str(err), param_hint="'INPUT'") from err
        except UnsupportedModelError as err:
            text = str(err)
            if job.to_keras3 and "to_keras3" not in text and "Keras 3" in text:
                hint = "Set `to_keras3=False` to write a Keras 2 model."
                raise UnsupportedModelError(f"{text} {hint}") from err
            raise


def _conclude(outcome, allow: bool, *, planned: bool) -> None:
    """Says so on stderr if the policy put dropout nowhere: a warning, or exit 3.

    Only a policy that asks for dropout can come out empty: `--rate 0`
    (removing the tool's dropout) is not. A rerun that keeps the tool's
    layers at their rate is not empty either (`Report.with_dropout`).
    """
    if not outcome.empty:
        return
    text = _no_dropout_message(outcome.report, planned)
    if allow:
        click.echo(f"Warning: {printable(text)}", err=True)
        return
    if planned:
        raise NoDropout(f"{text} Pass --allow-empty to accept that.")
    raise NoDropout(f"{text} Nothing written; pass --allow-empty to write the model anyway.")


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
        "the model's own dropout",
        "--existing keep leaves the dropout arguments the model has as they are: leave "
        "it out (or use --existing retarget) to set them to --rate.",
    ),
    (
        "`",
        "Pass the option the reason names to set that constructor argument "
        "(--rate, --attention-rate, --drop-path).",
    ),
    (
        "dropout crossing 0",
        "--exact refuses the kernel switch that setting these arguments would make: "
        "leave it out to accept it (the difference is measured and warned).",
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
            return as_flags(f"{what} {advice}")
    return as_flags(
        f"{what} Choose another --preset, or a --policy file with rules that set a rate."
    )


def _print_warnings(report) -> None:
    for note in report.warnings:
        click.echo(f"Warning: {printable(as_flags(note))}", err=True)


def _print_table(report) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from regularize.core.report import COLUMNS

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


cli.add_command(sweep)  # its own module; it imports no TensorFlow either


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="regularize")
