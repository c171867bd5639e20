"""`python -m regularize`."""

import os
import sys

# `python -m` puts the working folder first on `sys.path`, so a `json.py`
# beside a downloaded model would be imported in place of the standard
# library's. This package never imports from the working folder: drop it
# before anything else is imported (`python -P -m` and the `regularize`
# command do not add it in the first place).
try:
    _cwd = os.getcwd()
except OSError:  # the working folder was removed: nothing to import from there
    _cwd = None
if sys.path and sys.path[0] in ("", _cwd) and not sys.flags.safe_path:
    del sys.path[0]

from regularize.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
