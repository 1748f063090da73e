"""The processes of one ``w3s-simulate`` run: find them, stop them, even after it was killed.

Kept free of heavy imports: ``python -m server_app.run_processes`` is the guard process that
``w3s-simulate`` leaves watching over each run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# flwr passes its environment to the SuperLink it starts: this variable marks a run's own.
RUN_MARKER = "W3S_SIMULATE_RUN"
# What w3s-simulate tells its guard once it has stopped the run itself.
RUN_STOPPED = b"stopped"


def _live_processes() -> dict[int, tuple[int, bytes]]:
    """Parent pid and environment of each running process (Linux ``/proc``; none elsewhere)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (name) state ppid ...": the name may hold spaces and parentheses.
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                table[int(entry.name)] = (int(ppid), (entry / "environ").read_bytes())
    return table


def stop_marked_processes(marker: str, grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s``, the processes of the run marked ``marker``.

    ``flwr run`` leaves its local SuperLink running for later runs, and a run stopped midway
    leaves the simulation and its Ray workers too: they run in sessions of their own, so
    neither Ctrl-C nor the SuperLink's end reaches them, and they would go on training into
    the run directory. They inherit the marked environment, and the ones whose environment
    Ray rewrites are their descendants. Processes that another user or run started carry
    neither and are not ours to stop. Returns the processes signalled.
    """
    needle = f"{RUN_MARKER}={marker}".encode()
    ours: set[int] = set()

    def alive() -> list[int]:
        table = _live_processes()
        ours.update(pid for pid, (_, environ) in table.items() if needle in environ)
        grown = True
        while grown:  # a child of ours is ours, and its children too
            found = {pid for pid, (ppid, _) in table.items() if ppid in ours} - ours
            ours.update(found)
            grown = bool(found)
        ours.discard(os.getpid())
        return sorted(pid for pid in ours if pid in table)

    stopped = alive()
    for number in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, number)
        deadline = time.monotonic() + grace_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    return stopped


@contextlib.contextmanager
def guarded_run(marker: str, staging: Path, note: str = "") -> Iterator[None]:
    """Have a guard process stop the run and remove ``staging`` if this process dies inside.

    SIGKILL, the kernel's out-of-memory killer or a crashed interpreter end ``w3s-simulate``
    past every ``finally``, and its Flower processes, in sessions of their own, would go on
    training into the run directory. The guard, in a session of its own too, blocks on a pipe
    whose only writer is this process; the kernel closes it however this process ends. On a
    normal exit (the caller has stopped the run by then) it is told so and leaves at once.
    ``note`` ends the guard's message, which says what it stopped, on this process's stderr.
    Without POSIX processes (Windows) the run has its own clean-up only.
    """
    if os.name != "posix":
        yield
        return
    read_end, write_end = os.pipe()
    guard = subprocess.Popen(
        # -P: this module as installed, not a same-named package in the working directory.
        [sys.executable, "-P", "-m", __name__, str(read_end), marker, str(staging), note],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # it speaks, if at all, on stderr
        start_new_session=True,
    )
    os.close(read_end)
    try:
        with open(write_end, "wb", buffering=0) as pipe:
            yield
            with contextlib.suppress(BrokenPipeError):  # a guard stopped by someone else
                pipe.write(RUN_STOPPED)
    finally:
        guard.wait()  # on an error inside, until it has stopped what the caller may have left


def guard(read_end: int, marker: str, staging: Path, note: str) -> None:
    """Wait until ``w3s-simulate`` ends; unless it said it stopped its run, stop it here."""

    def stop_now(_signum: int, _frame: object) -> None:
        raise InterruptedError  # whoever stops the guard wants the run stopped too

    signal.signal(signal.SIGTERM, stop_now)
    with contextlib.suppress(InterruptedError), open(read_end, "rb") as pipe:
        if pipe.read() == RUN_STOPPED:
            return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The run read its staged files when it started; they go first, as that cannot take long.
    shutil.rmtree(staging, ignore_errors=True)
    stopped = stop_marked_processes(marker)
    if stopped:  # to w3s-simulate's stderr, which may have closed with it
        with contextlib.suppress(OSError):
            print(
                f"w3s-simulate ended without stopping its run; its guard stopped the run's "
                f"{len(stopped)} processes. {note}".strip(),
                file=sys.stderr,
                flush=True,
            )


if __name__ == "__main__":
    guard(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4])
