"""One copy of the weights: `regularize add-dropout` on a BERT-large-sized `.keras` file.

Run from the repository root:

    python benchmarks/hub_one_copy.py              # BERT-large shape, a few minutes on 2 cores
    python benchmarks/hub_one_copy.py --layers 4   # a smaller check of the script itself

A `keras_hub.models.BertBackbone` of BERT-large's shape (24 layers, hidden 1024, 16 heads,
intermediate 4096, vocabulary 30522: about 335M parameters, a 1.3 GB file; random weights) is
built once and saved to a temporary folder. Then, each in its own fresh process, peak RSS
(`os.wait4`'s `ru_maxrss` of that child) and wall time of:

  (a) `keras.saving.load_model(bert.keras)`
  (b) the same load, then `model.save(out.keras)`
  (c) `regularize add-dropout bert.keras --rate 0.2 -o out.keras`
  (d) the floor: `config.json` of the zip rewritten, every other member copied, no model built

(c) only changes a constructor argument (BERT's `dropout`), so its output's weights are the
input's bytes and only one copy of the model is ever in memory (`regularize.keras3.hub_edit`).
Targets: (c) peak RSS <= 1.2x (a), wall <= 1.2x (b). Every ratio is measured in this run and
printed with "met" or "NOT met"; nothing is asserted: the script exits 0 unless it cannot
measure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_TARGET = 1.2
WALL_TARGET = 1.2
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

_BUILD = """
import sys, keras, keras_hub
layers = int(sys.argv[2])
keras.utils.set_random_seed(0)
model = keras_hub.models.BertBackbone(
    vocabulary_size=30522, num_layers=layers, num_heads=16, hidden_dim=1024,
    intermediate_dim=4096, max_sequence_length=512,
)
model.save(sys.argv[1])
print(model.count_params())
"""
_LOAD = "import sys, keras, keras_hub; keras.saving.load_model(sys.argv[1])"
_LOAD_SAVE = "import sys, keras, keras_hub; keras.saving.load_model(sys.argv[1]).save(sys.argv[2])"
_CONFIG_EDIT = """
import json, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as source, zipfile.ZipFile(sys.argv[2], "w") as target:
    for info in source.infolist():
        if info.filename == "config.json":
            config = json.loads(source.read(info))
            config["config"]["dropout"] = 0.2
            target.writestr(info, json.dumps(config))
            continue
        with source.open(info) as reader, target.open(info, "w") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
"""


def _measure(command: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}")
    return usage.ru_maxrss / (1 << 20), wall  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as folder:
        bert = Path(folder) / "bert.keras"
        out = Path(folder) / "out.keras"
        built = subprocess.run(
            [python, "-c", _BUILD, str(bert), str(args.layers)],
            env=ENV,
            capture_output=True,
            text=True,
            check=True,
        )
        params = int(built.stdout.split()[-1])
        print(
            f"BertBackbone, {args.layers} layers: {params / 1e6:.0f}M parameters, "
            f"{bert.stat().st_size / 1e9:.2f} GB file"
        )
        runs = {
            "a": ("keras.saving.load_model", [python, "-c", _LOAD, str(bert)]),
            "b": ("load + save", [python, "-c", _LOAD_SAVE, str(bert), str(out)]),
            "c": (
                "regularize add-dropout",
                [python, "-m", "regularize", "add-dropout", str(bert), "--rate", "0.2"]
                + ["-o", str(out), "--force", "--quiet"],
            ),
            "d": ("config edit only", [python, "-c", _CONFIG_EDIT, str(bert), str(out)]),
        }
        results = {}
        for key, (label, command) in runs.items():
            out.unlink(missing_ok=True)
            rss, wall = _measure(command)
            results[key] = (rss, wall)
            print(f"({key}) {label:24s} peak RSS {rss:6.2f} GiB   wall {wall:6.1f} s")
    rss_ratio = results["c"][0] / results["a"][0]
    wall_ratio = results["c"][1] / results["b"][1]
    for name, ratio, target, against in (
        ("peak RSS", rss_ratio, RSS_TARGET, "(a)"),
        ("wall", wall_ratio, WALL_TARGET, "(b)"),
    ):
        verdict = "met" if ratio <= target else "NOT met"
        print(f"(c) {name} / {against}: {ratio:.2f} (target <= {target}: {verdict})")
    print(
        f"(d) floor / (c): peak RSS {results['d'][0] / results['c'][0]:.2f}, "
        f"wall {results['d'][1] / results['c'][1]:.2f}"
    )


if __name__ == "__main__":
    main()
