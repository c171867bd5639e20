"""keras-hub preset folders in: checked as data, then loaded by keras-hub itself.

`load_preset` runs every check before keras-hub deserializes anything:

- the folder's files (`preset_folder.check_tree`): no symbolic link out of
  the folder, no pipe or device;
- every JSON file (`config.json`, `task.json`, `preprocessor.json`,
  `tokenizer.json`, ...) through the one config checker
  (`regularize.core.checker.check_config`) with the allowlist `.keras` files
  get (`trust.keras3_allowlist`), the folder as the root whose files a
  config may name;
- the weights files (`preset_folder.weight_files`): HDF5 only, self-contained
  (`safety.check_h5_storage`), and the weights the configs declare, built
  with nothing allocated, against what the files store and the machine has
  (`budget.check_weight_budget`).

Only then is the model loaded with keras-hub's own `Backbone.from_preset` or
`<Task>.from_preset` (the task's class from `task.json`, as keras-hub's
`check_config_class` finds it). A handle (`bert_base_en`, `kaggle://...`,
`hf://...`) is downloaded by keras-hub first (`preset_utils.get_file`) and its
local copy is checked and loaded the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras

from regularize.core import budget
from regularize.core import checker
from regularize.core import preset_folder
from regularize.core.errors import ModelLoadError
from regularize.core.errors import first_line
from regularize.keras3 import trust


def load_preset(
    preset: str | os.PathLike,
    *,
    custom_objects: dict | None = None,
    safe_mode: bool = True,
) -> keras.Model:
    """Loads a keras-hub preset folder (or handle) after checking it; see the module.

    Returns:
        The `Backbone`, or the `Task` if the folder holds a `task.json`.

    Raises:
        ModelLoadError: One line: what is refused or wrong, expected, received.
    """
    folder = resolve(preset)
    check_preset(folder, custom_objects=custom_objects, safe_mode=safe_mode)
    received = f"Received: path={str(preset)!r}"
    try:
        with keras.saving.custom_object_scope(custom_objects or {}):
            return _from_preset(folder)
    except Exception as err:  # keras-hub raises many types; one line here
        raise ModelLoadError(
            f"Cannot read preset: keras-hub could not load it ({type(err).__name__}: "
            f"{first_line(err)[:300]}). Expected {preset_folder.EXPECTED}. {received}"
        ) from err


def resolve(preset: str | os.PathLike) -> Path:
    """The local folder of a preset: the folder itself, or keras-hub's download of a handle."""
    if preset_folder.is_preset_folder(preset):
        return Path(preset)
    text = os.fspath(preset)
    if not preset_folder.is_handle(text):
        raise ModelLoadError(
            f"Cannot read preset: no such folder, and not a preset handle. Expected "
            f"{preset_folder.EXPECTED}, or a keras-hub handle. Received: path={text!r}"
        )
    import keras_hub  # noqa: F401  registers the built-in presets
    from keras_hub.src.utils import preset_utils

    if "://" not in text and text not in preset_utils.BUILTIN_PRESETS:
        raise ModelLoadError(
            f"Cannot read model: no such file or folder, and no keras-hub preset of that name. "
            f"Expected a model file, {preset_folder.EXPECTED}, or a keras-hub handle. "
            f"Received: path={text!r}"
        )
    try:
        config = preset_utils.get_file(text, preset_folder.CONFIG_FILE)
    except Exception as err:  # unknown name, no network, ...: keras-hub's own words
        raise ModelLoadError(
            f"Cannot read preset {text!r}: {type(err).__name__}: {first_line(err)[:300]}. "
            f"Expected {preset_folder.EXPECTED}, or a keras-hub handle. Received: path={text!r}"
        ) from err
    return Path(config).parent


def check_preset(folder: Path, *, custom_objects: dict | None = None, safe_mode: bool = True):
    """Raises `ModelLoadError` if loading the preset folder could run code, read other files,
    or allocate far more than its weights files store."""
    received = f"Received: path={str(folder)!r}"
    files = preset_folder.check_tree(folder, received, unsafe=not safe_mode)
    texts = {}
    for name in preset_folder.json_files(files):
        texts[name] = preset_folder.read_json(folder, name, received)
    config = texts.get(Path(preset_folder.CONFIG_FILE))
    if not isinstance(config, dict) or "registered_name" not in config:
        # Transformers and timm folders are converted by keras-hub's own code,
        # weights included: not a file format this tool can check.
        raise ModelLoadError(
            f"Cannot read preset: its `{preset_folder.CONFIG_FILE}` is not a serialized Keras "
            f"object (no `registered_name`: a Transformers or timm checkpoint?). Expected "
            f"{preset_folder.EXPECTED}. {received}"
        )
    trust._import_named_packages(json.dumps(list(texts.values())))
    allowlist = trust.keras3_allowlist(custom_objects)
    for name, data in texts.items():
        checker.check_config(
            data,
            allowlist,
            received=f"Received: path={str(folder / name)!r}",
            unsafe=not safe_mode,
            root=str(folder),
        )
    weights = preset_folder.weight_files(folder, files, received)
    task = texts.get(Path(preset_folder.TASK_FILE))
    declared = trust.declared_weights(task or config, custom_objects)
    if declared:
        budget.check_weight_budget(
            declared,
            stored=preset_folder.stored_bytes(folder, weights),
            available=budget.available_memory(),
            received=received,
        )


def _from_preset(folder: Path) -> keras.Model:
    import keras_hub
    from keras_hub.src.utils import preset_utils

    task = folder / preset_folder.TASK_FILE
    if task.is_file():
        cls = preset_utils.check_config_class(preset_utils.load_json(str(folder), task.name))
        return cls.from_preset(str(folder))
    return keras_hub.models.Backbone.from_preset(str(folder))
