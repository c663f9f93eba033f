"""The measuring child process, seen from the sweep: start ``python -m harness.measure.worker`` on one job, pass
each record it sends on as it arrives, and turn a crash, a hang (the time limit) or a reported failure into one
line; and the progress bar a child's records advance."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[2]

class ChildResult(NamedTuple):
    n_records: int  # records received and written
    error: str | None  # why the child failed, None when it finished cleanly


def measure_in_child(job: dict[str, Any], timeout_s: float, on_record: Callable[[dict], None],
                     on_progress: Callable[[str], None], stderr_path: Path) -> ChildResult:
    """Run harness.measure.worker on `job`; pass each record to `on_record` as it arrives."""
    with open(stderr_path, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.measure.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=err, cwd=str(REPO), start_new_session=True,  # own group: a timeout kills it all
        )
    lines: queue.Queue[bytes | None] = queue.Queue()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    deadline = time.monotonic() + timeout_s
    n, reported = 0, None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill(proc)
                return ChildResult(n, f"timed out after {timeout_s:g} s (hung or too slow); killed")
            try:
                line = lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                break
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a dying child
            if msg.get("kind") == "record":
                on_record(msg["record"])
                n += 1
            elif msg.get("kind") == "progress":
                on_progress(msg["msg"])
            elif msg.get("kind") == "error":
                reported = msg["error"]
    except BaseException:
        _kill(proc)
        raise
    rc = proc.wait()
    if rc == 0 and reported is None:
        return ChildResult(n, None)
    if reported:
        return ChildResult(n, reported)
    return ChildResult(n, _describe_exit(rc, stderr_path))


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _describe_exit(rc: int, stderr_path: Path) -> str:
    tail = ""
    try:
        text = stderr_path.read_text(errors="replace").strip().splitlines()
        tail = next((x.strip() for x in reversed(text) if x.strip()), "")
    except OSError:
        pass
    if rc < 0:
        sig = signal.Signals(-rc).name
        why = {"SIGKILL": " (out of memory, or killed from outside)", "SIGSEGV": " (crash in native code)",
               "SIGABRT": " (llama.cpp aborted)", "SIGILL": " (instruction this CPU cannot run)",
               "SIGBUS": " (bad memory-mapped file)"}.get(sig, "")
        msg = f"measuring process died of {sig}{why}"
    else:
        msg = f"measuring process exited with status {rc}"
    return msg + (f"; last stderr line: {tail[:200]}" if tail else "")


class Bar:
    """A tqdm bar on stderr with a status text, or nothing when progress is off."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"  {desc}", unit="rep", leave=False, file=sys.stderr,
                              disable=None)  # None: no bar when stderr is not a terminal (a log file)

    def update(self, n: int) -> None:
        if self._bar:
            self._bar.update(n)

    def status(self, msg: str) -> None:
        if self._bar:
            self._bar.set_postfix_str(msg, refresh=True)

    def close(self) -> None:
        if self._bar:
            self._bar.close()
