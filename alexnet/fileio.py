"""Writing files so that a crash never leaves a half-written one: write a temporary file
beside the target, flush it to disk, rename it over the target, then make the rename
durable. Readers see the old file or the new one, never a mix."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
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


class OutputError(ValueError):
    """An output path that cannot be written as asked (a folder where a file should go, a
    file where a folder should); the message says which, in one line."""


class WriteError(OSError):
    """An OSError while writing a file with `atomic_write`: `filename` is the file asked
    for (not its temporary), `strerror` the system's reason, `errno` its number."""

    @classmethod
    def of(cls, e: OSError, path: str | Path) -> "WriteError":
        """`e`, raised while writing `path`, as a WriteError naming `path`."""
        return cls(e.errno, e.strerror or str(e), str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def not_a_file(path: str | Path, what: str) -> str:
    """Why `path`, which is not a regular file, cannot be read as `what` (e.g. "config
    file"): a folder, or a pipe, socket or device, is said to be one."""
    p = Path(path)
    if p.is_dir():
        return f"{path} is a folder, not a {what}"
    if p.exists():  # a named pipe, a socket, a device: reading it would wait, or never end
        return f"{path} is not a regular file (a pipe, socket or device), not a {what}"
    return f"no {what} at {path}"


def shown(path: str | os.PathLike) -> str:
    """`path` printable on one line of any terminal: bytes of a name that are not UTF-8
    as \\xNN, control characters (a newline, a tab) as Python writes them (\\n, \\t)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def refuse_overwriting(out: str | Path, *inputs: str | Path | None) -> None:
    """An OutputError if `out` is one of `inputs` (the same file by another name too): a
    command must not replace what it reads."""
    for src in inputs:
        try:
            same = src is not None and os.path.samefile(out, src)
        except OSError:  # out (or src) does not exist yet
            same = False
        if same:
            raise OutputError(f"{out} is the input {src} itself; give another output name")


def require_suffix(out: str | Path, what: str, *suffixes: str) -> None:
    """An OutputError unless file `out` ends in one of `suffixes`: `what` (e.g. "a PNG
    picture") under another extension would mislead whatever opens it by its name."""
    if Path(out).suffix.lower() not in suffixes:
        raise OutputError(f"{out}: this writes {what}; give a name ending in {' or '.join(suffixes)}")


def check_writable(out: str | Path, example: str = "out.json") -> None:
    """An OutputError, before any work, if file `out` cannot be written: a folder in its
    place, or no writable folder where it would go (missing folders are made later)."""
    slash = str(out).endswith(("/", os.sep))  # Path() drops it, and would write a file
    out = Path(out)
    if _is_dir(out):
        raise OutputError(f"{out} is a folder; give a file name such as {out / example}")
    if slash:
        raise OutputError(f"{out}/ names a folder; give a file name such as {out / example}")
    folder = out.parent
    while not _exists(folder):
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {out}: {folder} is not a writable folder")
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # (no pathconf: not POSIX)
        limit = 255
    for name in out.relative_to(folder).parts:  # (the names still to be made)
        if len(os.fsencode(name)) > limit:
            raise OutputError(f"cannot write {out}: the name {name[:24]}...{name[-8:]} is "
                              f"{len(os.fsencode(name))} bytes, longer than the {limit} the file system allows")


def writable_file(out: str) -> str:
    """argparse's `type` for an output file named on a command line: one that cannot be
    written is refused while the arguments are read (exit 2), before minutes of work."""
    import argparse
    try:
        check_writable(out, "results.json")
    except OutputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return out


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:  # a name too long (Python 3.11 raises it): not a folder
        return False


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:
        return False


def within(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` (which need not exist) is `folder` or lies below it, links resolved."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def check_folder_possible(folder: str | Path) -> None:
    """An OutputError, before any work, if the folder `folder` could not be made: a file
    in its place or in a parent's, or no writable folder above it (an existing folder is
    the caller's to judge)."""
    folder = Path(folder)
    existing = next((p for p in [folder, *folder.parents] if os.path.lexists(p)), None)
    if existing is None or existing == folder and existing.is_dir():
        return
    if not existing.is_dir():
        raise OutputError(f"cannot make the folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise OutputError(f"cannot make the folder {folder}: {existing} is not a writable folder")


def make_dir(folder: str | Path) -> Path:
    """`mkdir -p folder`, or an OutputError naming the part of the path that is a file."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise OutputError(f"cannot make the folder {folder}: {blocker} is a file") from None
    except OSError as e:
        raise WriteError.of(e, folder) from e
    return folder


@contextlib.contextmanager
def output_dir(folder: str | Path) -> Iterator[Path]:
    """`make_dir(folder)` for the outputs of the body; the folders it made are removed
    again if the body fails (or is interrupted) and leaves them empty."""
    folder = Path(folder)
    made = [p for p in [folder, *folder.parents] if not os.path.lexists(p)]  # deepest first
    make_dir(folder)
    try:
        yield folder
    except BaseException:
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not empty: something was written there after all
                break
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str | Path, write: Callable[[object], None]) -> None:
    """Call `write(fileobj)` on a temporary file beside `path`, fsync it, rename it over
    `path`. The file gets the permissions of a plain `open` (0666 less the umask), not the
    temporary file's 0600."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name")
    make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError.of(e, path) from e
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError.of(e, path) from e
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
