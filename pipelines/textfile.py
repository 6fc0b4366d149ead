"""Reading a user's text file strictly: UTF-8 (a byte-order mark is dropped), no NUL bytes, not empty.

Task TSVs, `text:<file>` tasks and pre-training corpora all come through `read_utf8`, so a wrong file fails
before any work with one line that names the file, the line and the byte to fix, instead of a
UnicodeDecodeError deep in a reader or numbers computed from garbage."""
from __future__ import annotations

import codecs
from pathlib import Path

from pipelines.errors import DataError


def _line_of(data: bytes, offset: int) -> int:
    """The 1-based line of byte `offset` (lines end at \\n, so CRLF files count the same)."""
    return data.count(b"\n", 0, offset) + 1


def decode_utf8(data: bytes, path: Path | str, what: str) -> str:
    """`data` (the bytes of `path`) as text: a leading BOM dropped; a NUL byte (a binary file) or bytes that
    are not UTF-8 (e.g. a Latin-1 file) raise a DataError naming `what`, the file, the line and the byte."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"{what}: {path} is not a text file (a NUL byte at byte {nul}, line {_line_of(data, nul)}); "
                        "give a UTF-8 text file")
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return str(memoryview(data)[start:], "utf-8")  # no copy of a large file
    except UnicodeDecodeError as err:
        offset = start + err.start  # in the file, BOM included
        raise DataError(f"{what}: {path}, line {_line_of(data, offset)}: byte {offset} (0x{data[offset]:02x}) is "
                        f"not UTF-8 ({err.reason}); the file is in another encoding (Latin-1?): save it as "
                        "UTF-8") from None


def read_utf8(path: Path | str, what: str) -> str:
    """The text of the file `path` (see `decode_utf8`); a missing, unreadable or empty (or whitespace-only) file
    raises a DataError that starts with `what` (the task or setting the file belongs to)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what}: {path} is a folder, not a text file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what}: {path} does not exist") from None
    except OSError as err:
        raise DataError(f"{what}: cannot read {path} ({err.strerror or err})") from None
    text = decode_utf8(data, path, what)
    if not text.strip():
        raise DataError(f"{what}: {path} is empty{' (only whitespace)' if text else ''}")
    return text
