"""One writer per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock`` for as long as the
process lives.

The kernel drops the lock when its holder exits, however it exits (``kill -9`` included), so a
lock file left behind by a dead run never blocks the next one; the file's JSON (host, pid, start
time) only tells a second writer who holds the directory. ``flock`` is per host on some network
filesystems: two hosts writing one run directory on such a filesystem are not caught.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # real run directory -> the locked file descriptor (kept open)


class RunDirLocked(RuntimeError):
    """Another process writes this run directory."""


def lock_run_dir(run_dir: str) -> None:
    """Locks ``run_dir`` (created if needed) for this process; a no-op if it already holds it.
    Raises :class:`RunDirLocked` naming the holder when another process does."""
    os.makedirs(run_dir, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _held:
        return
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "an unknown process"
        os.close(fd)
        raise RunDirLocked(f"{run_dir}: another run writes this directory ({holder}, {path}); "
                           "stop it or choose another run_dir") from None
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(record) + "\n").encode())
    _held[key] = fd


def unlock_run_dir(run_dir: str) -> None:
    """Releases this process's lock on ``run_dir`` (if it holds one)."""
    fd = _held.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock
