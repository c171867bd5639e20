"""A `.keras` archive read as data: its members bounded, its inner weights file in place.

Nothing here deserializes: `check_archive` bounds `config.json` and checks the inner
`model.weights.h5` through a read-only window onto the zip member (no copy, no
extraction); `config_text` and `stored_bytes` read what the pre-load check needs.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import h5py

from regularize.core import budget
from regularize.core import safety
from regularize.core.errors import ModelLoadError

MAX_CONFIG_BYTES = 64 << 20


def check_archive(path: Path, received: str) -> None:
    """A `.keras` archive's members: a config of sane size, weights kept inside the file.

    The HDF5 rules of `.h5` inputs (`safety.check_h5_storage`: no external
    storage or links, no inflating datasets) apply to the archive's weights
    files too: Keras reads them as it would an `.h5` file.
    """
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("config.json")
        if info.file_size > MAX_CONFIG_BYTES:
            raise ModelLoadError(
                f"Refusing to read model: its `config.json` is "
                f"{budget.format_bytes(info.file_size)}. Expected at most "
                f"{budget.format_bytes(MAX_CONFIG_BYTES)}. {received}"
            )
        for member in archive.infolist():
            if member.filename.endswith(".h5"):
                with _open_member(path, archive, member) as stream:
                    safety.check_h5_storage(stream, received)


def _open_member(path: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo):
    """A seekable file object over one archive member.

    A member stored as is is read in place through `_Window`: `zipfile`'s
    own stream seeks backwards by reading again from the start, which makes
    HDF5's many small reads take longer than loading the model.
    """
    if member.compress_type != zipfile.ZIP_STORED:
        return archive.open(member)
    with open(path, "rb") as raw:
        raw.seek(member.header_offset)
        header = raw.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        return archive.open(member)
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    start = member.header_offset + 30 + name_length + extra_length
    return _Window(path, start, member.file_size)


class _Window(io.RawIOBase):
    """Bytes `start` to `start + size` of a file, as a read-only seekable file."""

    def __init__(self, path: Path, start: int, size: int):
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115  closed by close()
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._size - self._pos))
        self._file.seek(self._start + self._pos)
        data = self._file.read(count)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def config_text(path: Path) -> str:
    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as archive:
            return archive.read("config.json").decode("utf-8", errors="replace")
    with h5py.File(path, "r") as f:
        text = f.attrs.get("model_config", "")
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def stored_bytes(path: Path) -> int:
    """The bytes of weight data a `.keras` archive or `.h5` file holds.

    An archive member stored as is (Keras writes them so) counts its size on
    disk: reading a member's HDF5 headers through `zipfile` takes longer than
    loading the model. A compressed member (a hand-made archive) counts the
    data of its datasets, since a few kilobytes can inflate to gigabytes of
    zeros.
    """
    if path.suffix != ".keras":
        return safety.h5_dataset_bytes(path)
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith((".h5", ".npz", ".json")):
                continue
            if info.compress_type == zipfile.ZIP_STORED or not info.filename.endswith(".h5"):
                total += min(info.file_size, max(info.compress_size, 0) or info.file_size)
                continue
            with archive.open(info) as member:
                total += safety.h5_dataset_bytes(member)
    return total
