"""The local executor: a suite's cells on this machine, one after another in this process, or
``jobs`` at once in spawned worker processes that are reused from cell to cell. A worker that
dies (killed, out of memory) fails its own cell only; Ctrl-C stops the pool, says which cells were
interrupted (they resume from their checkpoints) and which never started.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.cell_files import CellFiles
from bench.dispatch import cell_name, result_state
from bench.errors import UserError
from bench.events import Listener, ignore
from bench.suite import Cell, cell_ranks

def run_local(cells: list[Cell], suite_dir: Path, *, fresh: bool, on_event: Listener = ignore,
              jobs: int = 1) -> int:
    """Run the cells on this machine; returns the number of failed cells. ``jobs`` > 1 runs that
    many cells at once, each in a process of its own (spawned, so that no thread pool is forked);
    their progress then shows per cell, not per step. A cell whose resources ask for several
    ranks (``gpus_per_node``, ``ranks_per_node``, ``nodes``; ``run --ranks N`` sets them) runs as
    that many processes here (``bench.launch``)."""
    on_event({"event": "suite_start", "total": len(cells)})
    if jobs > 1 and len(cells) > 1:
        return _run_parallel(cells, suite_dir, fresh, on_event, jobs)
    failed = 0
    for cell in cells:
        on_event({"event": "cell_begin", "name": cell_name(cell)})
        status, detail = _run_one(cell, suite_dir, fresh, on_event)
        failed += status == "failed"
        on_event({"event": "cell_done", "name": cell_name(cell), "status": status, "detail": detail})
    return failed


def _run_one(cell: Cell, suite_dir: Path, fresh: bool, on_event: Listener = ignore) -> tuple[str, str]:
    """(status, detail) of one cell run here; an error that prevents even the failure record is
    reported as the cell's failure, and the grid goes on."""
    from bench.runner import run_cell

    try:
        nodes, per_node = cell_ranks(cell.resources)  # here, all of them on this machine
        count = nodes * per_node
        if count > 1:
            from bench.launch import run_on_ranks

            result = run_on_ranks(cell.config, suite_dir / cell.cell_id, key=cell.key, fresh=fresh, nprocs=count)
        else:
            result = run_cell(cell.config, suite_dir / cell.cell_id, key=cell.key, fresh=fresh, progress=on_event)
    except Exception as e:  # not even a failure record could be written: say so, run the rest
        return "failed", str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    if result is None:
        return "running elsewhere", ""
    if result["status"] == "ok":
        return "done", result_state(CellFiles(suite_dir / cell.cell_id).result).detail
    return "failed", str(result["reason"])


def _worker_loop(conn) -> None:
    """A worker process: runs the cells it is sent, one at a time, until told to stop (None).
    Kept for many cells: importing torch and timm costs seconds, a demo cell about ten."""
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            cell, suite_dir, fresh = task
            conn.send(_run_one(cell, suite_dir, fresh))
    except (KeyboardInterrupt, EOFError, OSError):
        pass  # Ctrl-C reaches the whole process group: the parent says what stopped


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (out of memory, or killed by hand)" if name == "SIGKILL" else ""
        return f"killed by {name}{why}"
    return f"exit code {code}"


def _run_parallel(cells: list[Cell], suite_dir: Path, fresh: bool, on_event: Listener, jobs: int) -> int:
    """At most ``jobs`` cells at once, in as many spawned worker processes, each reused for the
    next cell. A worker that dies (killed, out of memory) fails its own cell only and is
    replaced; Ctrl-C stops the run: no new cell starts, the running ones are stopped (they resume
    from their last checkpoint), and the event says which."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    pending = list(cells)
    workers: dict[Any, list[Any]] = {}  # process -> [its connection, the cell it runs or None]
    failed = 0

    def start_worker() -> None:
        parent, child = context.Pipe()
        process = context.Process(target=_worker_loop, args=(child,), daemon=True)
        process.start()
        child.close()
        workers[process] = [parent, None]

    def finish(cell: Cell, status: str, detail: str) -> None:
        nonlocal failed
        failed += status == "failed"
        on_event({"event": "cell_done", "name": cell_name(cell), "status": status, "detail": detail})

    try:
        for _ in range(min(jobs, len(cells))):
            start_worker()
        while pending or any(slot[1] is not None for slot in workers.values()):
            for slot in workers.values():
                if slot[1] is None and pending:
                    slot[1] = pending.pop(0)
                    slot[0].send((slot[1], suite_dir, fresh))
                    on_event({"event": "cell_begin", "name": cell_name(slot[1])})
            busy = [(process, slot) for process, slot in workers.items() if slot[1] is not None]
            wait([slot[0] for _, slot in busy] + [process.sentinel for process, _ in busy], timeout=5.0)
            for process, slot in busy:
                connection, cell = slot
                outcome = None
                try:
                    if connection.poll():
                        outcome = connection.recv()
                except (EOFError, OSError):
                    outcome = None
                if outcome is not None:
                    slot[1] = None
                    finish(cell, *outcome)
                elif not process.is_alive():
                    process.join()
                    connection.close()
                    del workers[process]
                    finish(cell, "failed", f"its worker process ended without a result ({_exit_text(process.exitcode)}); "
                                           "rerun to resume it from its last checkpoint")
                    if pending:
                        start_worker()
    except KeyboardInterrupt:
        stopped = [slot[1] for slot in workers.values() if slot[1] is not None]
        for process in workers:
            process.join(timeout=10)  # Ctrl-C reached them too; give them a moment to stop
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
        names = ", ".join(cell_name(c) for c in stopped) or "none"
        on_event({"event": "note", "text": f"interrupted: {len(stopped)} running cells stopped ({names}; they resume "
                                           f"from their last checkpoint when rerun), {len(pending)} not started"})
        raise
    finally:
        for process, (connection, _) in workers.items():
            try:
                connection.send(None)
            except (OSError, ValueError):
                pass
        for process in workers:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    return failed
