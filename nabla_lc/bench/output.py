"""Writing a benchmark's output directory: whole-file replacements, appended rows, and one writer per results file.

A crash (even ``kill -9``) at any moment leaves every file whole: a replaced file is either the old or the new
one, and an append can lose at most its own cut last line, which :func:`~nabla_lc.bench.runner.read_results`
repairs. A results file is written by one process at a time: :func:`output_lock` holds an ``fcntl.flock`` on
``<file>.lock``, which the kernel releases when the process ends, so a crashed run never leaves a stale lock.
Shards of one run write separate results files, so they share an output directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import IO, Any, Iterable, Iterator


class OutputInUseError(OSError):
    """Another process is writing the same results file; the message names the lock."""


def _temp_path(path: Path, pid: int | str) -> Path:
    return path.with_name(f".{path.name}.{pid}.tmp")


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``: written to a temporary sibling, synced, then renamed over it."""
    temp = _temp_path(path, os.getpid())  # why the pid: shards replace the shared run.json
    with temp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # why: the rename must never reach the disk before the data
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # why: makes the rename itself durable
    finally:
        os.close(directory)


def jsonl(rows: Iterable[dict[str, Any]]) -> str:
    """Rows as JSON lines, each ended by a newline."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` by the rows as JSON lines (:func:`write_atomic`)."""
    write_atomic(path, jsonl(rows))


def append_jsonl(out: IO[str], rows: Iterable[dict[str, Any]]) -> None:
    """Append rows to an open results file and sync it: a crash loses at most the rows in flight."""
    out.write(jsonl(rows))
    out.flush()
    os.fsync(out.fileno())


@contextlib.contextmanager
def output_lock(results: Path) -> Iterator[None]:
    """Hold the lock of a results file for the enclosed writes; raise :class:`OutputInUseError` if another process holds it."""
    lock = results.with_name(results.name + ".lock")
    with lock.open("a") as f:  # why "a": creates the file without truncating one that another process has open
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUseError(
                f"another nabla-lc bench is writing {results} (it holds the lock {lock}); wait for it to finish or use another --out"
            ) from None
        for temp in results.parent.glob(_temp_path(results, "*").name):  # only a killed writer leaves one behind
            temp.unlink(missing_ok=True)
        yield  # why no unlock: closing the file releases the lock, and so does the end of the process
