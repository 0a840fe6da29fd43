"""Which process of a cell this is: its rank among the cell's processes (torch-free).

One cell may run as several processes, one per GPU (``bench.launch``): torchrun, submitit's
``TorchDistributedEnvironment().export()`` and ``bench.launch`` all describe a process by the
same environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), read here. Rank 0 is the
cell's *main* process: it holds the cell's lock, decides whether the cell runs, and is the only
one that writes files. Every other rank trains and evaluates its share and writes nothing.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from bench.errors import UserError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Ranks":
        """This process's ranks as torchrun or submitit set them; one process when unset."""
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            ranks = cls(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
        except ValueError:
            raise UserError(f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, LOCAL_RANK="
                            f"{env.get('LOCAL_RANK')!r}: the distributed environment must hold integers") from None
        if not 0 <= ranks.rank < ranks.world_size:
            raise UserError(f"RANK={ranks.rank} is outside WORLD_SIZE={ranks.world_size}")
        return ranks

    def shard(self, n: int) -> range:
        """This rank's contiguous part of ``n`` items (evaluation): the ranks' parts in rank
        order are the items in order, sizes differ by at most one."""
        start = n * self.rank // self.world_size
        return range(start, n * (self.rank + 1) // self.world_size)


ONE = Ranks()
