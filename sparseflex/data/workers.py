"""A small process pool for batch jobs over many files: spawned workers, a timeout per task, crash isolation.

``concurrent.futures`` cannot stop one running task; here every worker talks to the parent over its own pipe, so a
task that runs past its timeout (or a worker that dies, e.g. in a native library) costs only that worker: it is
killed, the task is reported as failed with the reason, and a fresh worker takes its place. Workers are started
with the ``spawn`` method (safe with threads and CUDA) and report ready only after their imports, so start-up time
never counts against a task's timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Callable, Iterable, Iterator

from ..errors import SparseFlexError

#: Seconds between checks of running tasks' deadlines.
POLL = 0.2
#: Seconds between a worker's checks that its parent still lives.
PARENT_POLL = 0.5


@dataclass
class TaskResult:
    """Outcome of one task: its position in the input, ``ok``, and the return value or the failure reason."""
    index: int
    ok: bool
    value: object


def describe(exc: Exception) -> str:
    """One line: a user error's message as is, anything else prefixed by its type (a bug, not a bad file)."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, SparseFlexError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def _exit_with_parent(parent: int) -> None:
    """In a worker: end the process, quietly, once the parent that started it is gone (killed with SIGKILL, it
    could not stop its workers), instead of finishing a task nobody will collect."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    os._exit(0)


def _worker_main(fn: Callable, initializer: Callable | None, conn) -> None:
    """A worker's loop: run the tasks the parent sends until it sends ``None``. A worker whose parent is gone
    (killed, or ended without stopping it) has no one to report to: it exits quietly, without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops the workers
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    if initializer is not None:
        initializer()
    try:
        conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg is None:
                return
            index, task = msg
            try:
                result = (index, True, fn(task))
            except Exception as exc:  # one bad task never ends the worker
                result = (index, False, describe(exc))
            conn.send(("done", result))
    except (EOFError, OSError):  # the parent closed its end or died (BrokenPipeError, ConnectionResetError, ...)
        return


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: object
    ready: bool = False
    index: int | None = None   # running task
    started: float = 0.0


def run_tasks(fn: Callable, tasks: Iterable, workers: int, timeout: float | None = None,
              initializer: Callable | None = None) -> Iterator[TaskResult]:
    """Apply the picklable top-level ``fn`` to every task in ``workers`` spawned processes, yielding a
    :class:`TaskResult` per task as it finishes (in completion order).

    A task raising an exception, running longer than ``timeout`` seconds or killing its worker yields ``ok=False``
    with a one-line reason; the others go on. ``workers=0`` runs everything in this process (no timeout: for
    debugging). ``initializer`` runs once in each worker before its first task.
    """
    tasks = list(tasks)
    if workers <= 0:
        if initializer is not None:
            initializer()
        for index, task in enumerate(tasks):
            try:
                yield TaskResult(index, True, fn(task))
            except Exception as exc:
                yield TaskResult(index, False, describe(exc))
        return
    ctx = mp.get_context("spawn")
    pending = deque(enumerate(tasks))
    pool: list[_Worker] = []
    failed_starts = 0

    def start() -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(fn, initializer, child), daemon=True)
        proc.start()
        child.close()
        pool.append(_Worker(proc, parent))

    def stop(w: _Worker) -> None:
        pool.remove(w)
        if w.process.is_alive():
            w.process.kill()
        w.process.join()
        w.conn.close()

    try:
        for _ in range(min(workers, len(pending))):
            start()
        while pool:
            for w in pool:
                if w.ready and w.index is None:
                    if pending:
                        w.index, task = pending.popleft()
                        w.started = time.monotonic()
                        w.conn.send((w.index, task))
                    else:
                        w.conn.send(None)
            for w in [w for w in pool if w.ready and w.index is None]:
                stop(w)  # no work left for it
            if not pool:
                break
            for conn in wait([w.conn for w in pool], timeout=POLL):
                w = next(w for w in pool if w.conn is conn)
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):  # the worker died
                    index = w.index
                    stop(w)
                    code = w.process.exitcode
                    if index is None:
                        failed_starts += 1
                        if failed_starts > workers:
                            raise RuntimeError(f"worker processes keep dying before their first task (exit code "
                                               f"{code}); a script that starts them needs the guard "
                                               f"`if __name__ == '__main__':`") from None
                    else:
                        yield TaskResult(index, False, f"worker process died (exit code {code})")
                    if pending:
                        start()
                    continue
                if kind == "ready":
                    w.ready = True
                else:
                    late = timeout and time.monotonic() - w.started > timeout
                    w.index = None
                    # a result that arrives after the deadline (between two polls) is as late as one never sent
                    yield (TaskResult(payload[0], False, f"timed out after {timeout:g} s") if late
                           else TaskResult(*payload))
            now = time.monotonic()
            for w in [w for w in pool if w.index is not None and timeout and now - w.started > timeout]:
                index = w.index
                stop(w)
                yield TaskResult(index, False, f"timed out after {timeout:g} s")
                if pending:
                    start()
    finally:
        for w in list(pool):
            stop(w)
