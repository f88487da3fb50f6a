"""One round at a time, across processes: an exclusive `flock` on `<data>/training/round.lock`.

The kernel drops the lock when its holder dies, SIGKILL included, so a killed round never
leaves a stale lock behind; the file's text (pid, start time) names the holder in the "busy"
message.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from feedback.config import make_folder
from serving.config import data_dir


class RoundBusy(Exception):
    """Another round holds the lock."""


def lock_path() -> Path:
    path = data_dir() / "training" / "round.lock"
    make_folder(path.parent)
    return path


@contextmanager
def round_lock():
    path = lock_path()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "unknown"
            raise RoundBusy(f"Another round is running ({holder}); try again when it ends.") \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock
