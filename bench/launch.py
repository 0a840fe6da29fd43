"""One cell as several processes, one per GPU, with torch's and submitit's own launchers.

* Locally (``peft-dml cell --ranks N``, ``run --ranks N``): ``run_on_ranks`` starts N processes
  through torch's ``elastic_launch``, what ``torchrun --standalone --nproc-per-node N`` runs.
  A cell started by ``torchrun`` itself (``torchrun --nproc-per-node N run_suite.py cell ...``)
  takes the same path: ``rank_main`` reads the ranks torchrun exported.
* On SLURM (``resources.gpus_per_node: N``, ``nodes: M``): N x M tasks; each task exports
  submitit's ``TorchDistributedEnvironment`` and runs ``rank_main`` (``bench.dispatch.CellJob``).

Every process joins the cell's process group and calls ``bench.runner.run_cell`` with its ranks:
rank 0 decides, writes and returns the result. A rank that dies fails the cell naming the rank
and its exit (signal or traceback); the cell's last checkpoint stays, so the next run resumes.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from bench.cell_files import CellFiles
from bench.config import CellConfig
from bench.events import log_event
from bench.ranks import Ranks

LOST_PEER_GRACE_S = 2.0  # ten of the local launcher's monitor intervals


def rank_main(config_fields: dict[str, Any], cell_dir: str, key: dict[str, Any], fresh: bool = False,
              progress=None) -> dict[str, Any] | None:
    """What each process of a cell runs: join the group, run this rank's part of the cell. Returns
    the result on rank 0. A rank whose part failed ends its process at once with exit code 1
    (``distributed.leave``): tearing the group down after a lost peer would abort instead."""
    from bench import distributed
    from bench.errors import CellFailure
    from bench.runner import run_cell
    from bench.train import select_device

    ranks = Ranks.from_env()
    config = CellConfig.from_dict(config_fields, where="cell")
    if progress is not None and ranks.main:
        from bench.events import log_to_stdout

        log_to_stdout()
    distributed.start(ranks, select_device(config.device, ranks), timeout_s=config.collective_timeout_s)
    try:
        result = run_cell(config, Path(cell_dir), key=key, fresh=fresh, progress=progress if ranks.main else None,
                          ranks=ranks)
    except CellFailure as failure:  # a rank other than the main one: its reason goes to its stderr
        logging.getLogger("bench").error("%s", failure)
        distributed.leave(1)
    if distributed.peer_lost():  # the main rank wrote the failure; the group cannot be torn down
        if ranks.main:
            # the launcher names the first rank it sees fail: let it see the one that died first
            time.sleep(LOST_PEER_GRACE_S)
        distributed.leave(1)
    distributed.finish()
    return result


def run_on_ranks(config: CellConfig, cell_dir: Path, *, key: dict[str, Any], fresh: bool = False,
                 nprocs: int) -> dict[str, Any] | None:
    """Run one cell as ``nprocs`` local processes (one per GPU, or gloo processes on the CPU) and
    return its result; a rank that died is named in the result's reason."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn")
    started = dt.datetime.now(dt.timezone.utc)
    try:
        # rank 0's progress as log lines (the events of another process cannot reach a live view)
        returned = elastic_launch(launch, rank_main)(config.to_dict(), str(cell_dir), key, fresh, log_event)
    except ChildFailedError as e:
        return rank_failure(config, Path(cell_dir), key, e.failures, started)
    return returned.get(0)


def describe_exit(rank: int, failure) -> str:
    """'rank 1 was killed by SIGKILL' / 'rank 1 exited with code 1'."""
    if failure.exitcode < 0:
        return f"rank {rank} was killed by {failure.signal_name()}"
    return f"rank {rank} exited with code {failure.exitcode}"


def rank_failure(config: CellConfig, cell_dir: Path, key: dict[str, Any], failures: dict, started) -> dict[str, Any]:
    """After a launch where ranks failed: the result rank 0 wrote in this launch, its reason
    completed by which ranks died how; or, when rank 0 wrote none (it died too), a failed result
    naming them. A finished result is never overwritten; the checkpoint is kept."""
    from bench.results import atomic_write_json, read_result
    from bench.runner import failed_result

    exits = "; ".join(describe_exit(rank, failure) for rank, failure in sorted(failures.items()))
    path = CellFiles(cell_dir).result
    try:
        result = read_result(path) if path.is_file() else None
    except Exception:
        result = None
    if result is not None and result.get("status") == "ok":
        return result
    logs = sorted(p.name for p in cell_dir.glob("error.rank*.log") if p.stat().st_mtime >= started.timestamp())
    exits += f"; tracebacks in {', '.join(logs)}" if logs else ""
    written_now = result is not None and (result.get("provenance") or {}).get("started", "") >= started.isoformat()
    if written_now:
        result["reason"] = f"{result['reason']} ({exits})"
    else:
        result = failed_result(config, cell_dir, key,
                               f"{exits}; the cell resumes from its last checkpoint when run again")
    atomic_write_json(path, result)
    return result
