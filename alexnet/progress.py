"""A progress line for long loops: count, rate, ETA and live figures, redrawn in place on
a terminal and printed every so often otherwise (logs of batch jobs)."""

from __future__ import annotations

import os
import sys
import time


def plural(n: int, noun: str) -> str:
    """'1 image', '2 images' (nouns whose plural adds an s)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def first_few(names: list[str], shown: int) -> str:
    """'a, b, c ...': the first `shown` names, and '...' when there are more (for messages)."""
    return ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int, label: str, unit: str = "img", stream=None, every_s: float = 30.0,
                 enabled: bool = True, done: int = 0):
        """`done`: work finished before this run (a resumed job); rate and ETA count only new work."""
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every_s = every_s if not self.tty else 0.2
        self.enabled = enabled
        self.done = self.start_done = done
        self.start = self.last = time.perf_counter()

    def update(self, n: int, **figures: float | str) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.every_s:
            return
        self.last = now
        self._draw(now, figures, final=False)

    def _draw(self, now: float, figures: dict, final: bool) -> None:
        elapsed = now - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.label} {pct:5.1f}% {self.done}/{self.total}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()]
        parts.append(f"{rate:.1f} {self.unit}/s")
        parts.append(f"elapsed {format_duration(elapsed)}" if final else
                     f"ETA {format_duration(eta) if eta != float('inf') else '?'}")
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, **figures: float | str) -> float:
        """Print the final line; returns the rate."""
        now = time.perf_counter()
        if self.enabled:
            self._draw(now, figures, final=True)
        elapsed = now - self.start
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0


def to_devnull(stream) -> None:
    """Point `stream`'s file descriptor at /dev/null (its reader is gone)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass


class StreamError(OSError):
    """Standard output or error could not be written (a full disk under `> log`, an I/O
    error): `strerror` is the one line to show, `stream` the stream that failed."""

    def __init__(self, errno: int | None, text: str, stream):
        super().__init__(errno, text)
        self.stream = stream


class GuardedStream:
    """sys.stdout or sys.stderr for a command: a write that fails for another reason than
    a reader gone (BrokenPipeError, handled as such) is a `StreamError` naming the stream,
    not a traceback from wherever it was printing."""

    def __init__(self, stream, name: str):
        self._stream, self._name = stream, name

    def write(self, text: str) -> int:
        return self._guarded(self._stream.write, text)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def _guarded(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StreamError(e.errno, f"cannot write {self._name}: {e.strerror or e}", self) from None

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


class GoneReader:
    """A text stream (stdout, stderr) that outlives its reader: when the pipe it writes to
    breaks (`alexnet train | tee log` and a Ctrl-C that ends tee too, or `| head`), or a
    write fails (a full disk under `> log`), later writes go nowhere and `on_break` is
    called once with the error, instead of the error ending the process wherever it was
    printing (a signal handler, or a step) before it saved."""

    def __init__(self, stream, on_break):
        self._stream, self._on_break, self.broken = stream, on_break, False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except OSError as e:
                self._broke(e)
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except OSError as e:
                self._broke(e)

    def _broke(self, error: OSError) -> None:
        self.broken = True
        to_devnull(self._stream)  # what is left in its buffer, and the exit's flush, go nowhere
        self._on_break(error)

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)
