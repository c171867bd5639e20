"""The options the commands share, and the checks that run on them before TensorFlow loads."""

from __future__ import annotations

from pathlib import Path

import click

from regularize.cli.runtime import check_path
from regularize.cli.runtime import path_callback
from regularize.core import preset_folder
from regularize.core.errors import ModelLoadError
from regularize.core.errors import PolicyError
from regularize.core.rules import validate_rate
from regularize.keras3 import applications


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


def _input_shape(ctx, param, value):
    if value is None:
        return None
    try:
        return applications.parse_input_shape(value)
    except ModelLoadError as err:
        raise click.BadParameter(str(err), ctx, param) from err


def _input_callback(ctx, param, value):
    if preset_folder.is_remote(value):
        return value  # `hf://org/name`: a Path would fold the `//`
    return _check_input(check_path(Path(value), "'INPUT'"))


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
        type=click.Path(),
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
    *(
        click.option(flag, type=RATE, default=None, help=text)
        for flag, text in (
            (
                "--recurrent-rate",
                "recurrent_dropout for RNN layers (disables cuDNN on GPU). Default: unchanged.",
            ),
            (
                "--attention-rate",
                "Dropout on attention probabilities (MultiHeadAttention, attention_dropout "
                "keys; disables fused attention on GPU). Default: unchanged.",
            ),
            (
                "--drop-path",
                "Stochastic depth: drop the residual branch of each residual Add per "
                "sample, the rate growing with depth up to this at the last block (a "
                "keras-hub model's drop_path_rate / max_drop_path_rate). Default: off.",
            ),
        )
    ),
    click.option(
        "--existing",
        type=click.Choice(["keep", "retarget", "remove"]),
        default=None,
        help="Dropout the model already has: keep it, retarget it to the rate, or remove "
        "it. Default: Dropout layers are kept; dropout settings (a keras-hub model's "
        "dropout argument, an attention layer's own rate) follow the rate.",
    ),
    click.option(
        "--exact",
        is_flag=True,
        help="Refuse every change that is not bit-identical at inference (an attention "
        "layer whose dropout crosses 0 switches kernels; otherwise warned, with the "
        "measured difference).",
    ),
)


# The options of `_policy_options` that set a rate, in `Policy`'s names.
RATE_OPTIONS = ("rate", "recurrent_rate", "attention_rate", "drop_path")
# The other settings of `_policy_options`, in `Policy`'s names (None / False: not given).
SETTING_OPTIONS = ("existing", "exact")


def _policy(policy_file, preset, options: dict, *, mc=False):
    """The policy of a command line, checked before the slow TensorFlow import.

    Takes the rate options out of `options` (a command's keyword arguments).
    """
    from regularize.core.policy import Policy

    defaults = {name: options.pop(name) for name in RATE_OPTIONS}
    settings = {name: options.pop(name) for name in SETTING_OPTIONS}
    defaults.update({name: value for name, value in settings.items() if value})
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


MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def _check_input(input: Path) -> Path:
    """INPUT if some engine may read it; else one line, exit 2, before TensorFlow is imported.

    What the file holds is the loaders' to judge (exit 1); its name and kind
    are checked here, at once, like a missing file.
    """
    if input.is_dir():
        if (input / "saved_model.pb").is_file() or preset_folder.is_preset_folder(input):
            return input
        problem = (
            "it is a folder, and neither a SavedModel (no `saved_model.pb`) nor a keras-hub "
            "preset (no `config.json`)"
        )
    elif input.exists():
        if input.suffix in MODEL_SUFFIXES:
            return input
        problem = f"unsupported file type {input.suffix or '(none)'!r}"
    elif applications.is_application_name(input) or preset_folder.is_handle(input):
        return input  # a keras-hub handle is keras-hub's to resolve (exit 1 if it cannot)
    else:
        problem = "no such file"
    raise click.BadParameter(
        f"{problem}. Expected a `.keras` or `.h5` model, a SavedModel folder or a keras-hub "
        "preset folder. "
        f"Received: {str(input)!r}",
        param_hint="'INPUT'",
    )


def _is_application(input: Path | str) -> bool:
    return applications.is_application_name(input) and not Path(input).exists()


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
