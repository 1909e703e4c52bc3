"""Per-pair claims, so that several launchers (threads, processes, machines on a shared filesystem)
can work on one ``--out`` without running a pair twice.

A pair is **done** when its ``result.json`` exists. A launcher that wants to run a pair first
**claims** it: it writes ``<run_dir>/claim.json`` (host, process, launcher, time) under an exclusive
``flock`` on ``<run_dir>/.claim.lock``, unless a live claim is already there. While the pair runs the
holder **heartbeats** (touches the claim) every ``timeout / 4`` seconds, and **releases** it (removes
the file) when the pair ends, finished or failed. A claim is **stale**, and may be taken over, when
its holder is a process on this host that no longer exists, or when it has not been touched for
``timeout`` seconds (a holder on another machine that died or lost the filesystem).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CLAIM_FILE = "claim.json"
CLAIM_LOCK = ".claim.lock"
#: Seconds without a heartbeat after which a claim of another host is stale (10 min by default).
DEFAULT_TIMEOUT = 600.0


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def pair_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive ``flock`` on the pair's lock file (held for milliseconds: check and write a claim)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / CLAIM_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_claim(path: Path) -> dict[str, Any] | None:
    """The claim at ``path`` (with its age in seconds), or None when there is none."""
    try:
        holder = json.loads(path.read_text())
        holder["age"] = time.time() - path.stat().st_mtime
    except (FileNotFoundError, ValueError):
        return None
    return dict(holder)


def is_stale(holder: dict[str, Any], timeout: float) -> bool:
    """Whether a claim's holder is gone: a dead process on this host, or no heartbeat for ``timeout`` s."""
    if holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1))):
        return True
    return float(holder["age"]) > timeout


class Claim:
    """A held claim on one pair: heartbeats in a daemon thread until :meth:`release`."""

    def __init__(self, path: Path, holder: dict[str, Any], timeout: float) -> None:
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(max(timeout / 4, 0.05),), daemon=True)
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # taken over as stale (e.g. this process was suspended too long)
                return

    def owned(self) -> bool:
        """Whether the claim file is still this holder's."""
        current = read_claim(self.path)
        return current is not None and current.get("token") == self.holder["token"]

    def release(self) -> None:
        """Stop heartbeating and remove the claim if it is still this holder's."""
        self._stop.set()
        self._thread.join()
        with pair_lock(self.path.parent):
            if self.owned():
                self.path.unlink()


def try_claim(run_dir: Path, launcher: str, timeout: float = DEFAULT_TIMEOUT) -> Claim | None:
    """Claim the pair in ``run_dir``; None when it is done (``result.json``) or claimed by a live holder.
    A stale claim is taken over."""
    from petl_lightning.vtab.plan import RESULT_FILE

    path = run_dir / CLAIM_FILE
    with pair_lock(run_dir):
        if (run_dir / RESULT_FILE).is_file():
            return None
        current = read_claim(path)
        if current is not None and not is_stale(current, timeout):
            return None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "launcher": launcher,
            "since": _dt.datetime.now().isoformat(timespec="seconds"),
            "token": f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{time.time_ns()}",
        }
        tmp = path.with_name(f".{CLAIM_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(holder))
        os.replace(tmp, path)
    return Claim(path, holder, timeout)


def describe(run_dir: Path) -> str:
    """Who holds the pair's claim, for messages ("host pid 123 (ray) since ..."), or ""."""
    holder = read_claim(run_dir / CLAIM_FILE)
    if holder is None:
        return ""
    return f"{holder.get('host')} pid {holder.get('pid')} ({holder.get('launcher')}) since {holder.get('since')}"


__all__ = ["CLAIM_FILE", "DEFAULT_TIMEOUT", "Claim", "describe", "is_stale", "read_claim", "try_claim"]
