"""One process at a time per run directory: an exclusive lock (flock: Linux NFS clients make it an
NFS lock seen across nodes; Lustre with its `flock` mount option) on <run_dir>/.lock, held by the train stage from before it resumes to
after its final outputs, so two trainings of one run cannot race at a checkpoint's rename, append
to one metrics log, or remove each other's temp files. The file names its holder (PID, host,
since when); the kernel drops the lock when the holder dies, so a killed run never blocks the next."""
from __future__ import annotations

import datetime
import fcntl
import os
import platform
from pathlib import Path

LOCK = ".lock"


class RunLock:
    """`with RunLock(run_dir, error):` holds the run directory's lock, or raises `error` naming its holder."""

    def __init__(self, run_dir: str | Path, error: type[Exception] = RuntimeError):
        self.path, self.error, self.fd = Path(run_dir) / LOCK, error, None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # flock: closing another fd of the file keeps it
            except OSError:
                holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise self.error(f"{self.path.parent}: in use by {holder} (lock {self.path}); wait for it to "
                                 "finish or stop it, then run again") from None
            try:   # the last holder unlinks the file as it lets go: locked a removed file? open the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on {platform.node()} since {since}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)   # before unlocking, so no one locks the old file after us
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
