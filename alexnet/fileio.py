"""Writing files so that a crash never leaves a half-written one: write a temporary file
beside the target, flush it to disk, rename it over the target, then make the rename
durable. Readers see the old file or the new one, never a mix."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where built kernels and computed statistics are kept: $ALEXNET_CACHE, else
    $XDG_CACHE_HOME/alexnet, else ~/.cache/alexnet."""
    root = os.environ.get("ALEXNET_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "alexnet")
    return Path(root).expanduser()


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[object], None]) -> None:
    """Call `write(fileobj)` on a temporary file beside `path`, fsync it, rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def json_bytes(data, indent: int | None = None) -> bytes:
    """`data` as JSON in UTF-8, readable where it can be; a file name that is not UTF-8 (a
    str with surrogate escapes, as os.listdir gives it) makes the document \\u-escaped,
    which json.loads gives back exactly."""
    try:
        return json.dumps(data, indent=indent, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(data, indent=indent).encode()


def atomic_write_json(path: str | Path, data: dict) -> None:
    text = json_bytes(data, indent=1) + b"\n"
    atomic_write(path, lambda f: f.write(text))
