"""The output folder of a sweep: one marker per finished run, so that a rerun resumes.

For each variant and seed the folder gets `variant-<label>-seed<seed>.keras` (the variant at
its best validation epoch) and then `variant-<label>-seed<seed>.json` (the marker: the
sweep's settings, the variant's identity and its results). A sweep started again with the
same folder trains only the runs without a marker, and refuses a folder whose markers hold
other settings.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from collections.abc import Sequence
from pathlib import Path

from regularize.core import atomic
from regularize.sweep.errors import SweepError
from regularize.sweep.results import VariantResult
from regularize.sweep.variants import Variant


def output_folder(model, out=None) -> Path:
    """Where a sweep of `model` writes: `out`, or the default (see `run_sweep`).

    Creates nothing.
    """
    if out is not None:
        return Path(out)
    if isinstance(model, (str, os.PathLike)):
        return Path(model).with_name(f"{Path(model).stem}_sweep")
    return Path(f"{getattr(model, 'name', 'model')}_sweep")


@contextlib.contextmanager
def keeping_no_empty_folder(out: Path) -> Iterator[Path]:
    """Creates `out` and its missing parents, and removes them again if the sweep fails.

    Only folders this call created and that are still empty are removed: a failed sweep
    leaves no empty folder behind, and never removes a finished run.

    Raises:
        SweepError: `out` is a file, or cannot be created.
    """
    if out.exists() and not out.is_dir():
        raise SweepError(
            f"Cannot write the sweep to {str(out)!r}: it is a file. Expected a folder "
            "(new, or one an earlier run of this sweep wrote).",
            argument="out",
        )
    created = [p for p in (out, *out.parents) if not os.path.lexists(p)]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SweepError(
            f"Cannot create the sweep folder {str(out)!r}: {err.strerror}", argument="out"
        ) from err
    try:
        yield out
    except BaseException:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise


def stem(label: str, seed: int) -> str:
    return f"variant-{label}-seed{seed}"


def write_marker(folder: Path, variant: Variant, settings: dict, result: VariantResult) -> None:
    """Marks a run finished: its results, next to its model file."""
    atomic.write_json(
        folder / f"{stem(variant.label, result.seed)}.json",
        {"settings": settings, "variant": variant.describe(), "result": result.to_dict()},
    )


def finished(
    out: Path, variants: Sequence[Variant], seeds: Sequence[int], settings: dict
) -> dict[tuple[str, int], VariantResult]:
    """The runs (label, seed) that an earlier run of the same sweep finished.

    Raises:
        SweepError: A marker holds other settings, or another variant under the same label.
    """
    done = {}
    settings = jsonable(settings)
    for variant in variants:
        described = jsonable(variant.describe())
        for seed in seeds:
            marker = out / f"{stem(variant.label, seed)}.json"
            if not marker.is_file():
                continue
            try:
                saved = json.loads(marker.read_text())
                result = VariantResult.from_dict(saved["result"])
                saved_settings, saved_variant = saved["settings"], saved["variant"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable (cut short by a crash?): train it again
            if saved_settings != settings:
                changed = sorted(
                    key
                    for key in set(settings) | set(saved_settings)
                    if settings.get(key) != saved_settings.get(key)
                )
                _refuse(out, marker, f"{', '.join(changed)} differ")
            if saved_variant != described:
                _refuse(out, marker, f"variant {variant.label!r} differs")
            if (out / result.model_file).is_file():
                done[variant.label, seed] = result
    return done


def _refuse(out: Path, marker: Path, what: str) -> None:
    raise SweepError(
        f"Cannot resume: {str(out)!r} holds results of a sweep with other settings ({what}, "
        f"in {marker.name}). Expected the same model, data, epochs, batch size, policies and "
        "compile config. Choose another output folder, or delete that one.",
        argument="out",
    )


def jsonable(value):
    return json.loads(json.dumps(value))
