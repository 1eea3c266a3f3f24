"""Offline scale-out under ``torchrun``: which files a rank reads, and the gather to rank 0.

``torchrun --nproc-per-node N modloc infer …`` starts N processes with ``RANK`` and
``WORLD_SIZE`` set. Each reads every N-th file (:func:`shard_files`), keeps its own
per-class top-K, and rank 0 gathers the others' serialized states (:func:`gather`, a
gloo ``gather_object``) and merges them exactly. Without torchrun (no ``WORLD_SIZE``, or
1) everything runs in this process and torch is never imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """This process's place: ``rank`` of ``world_size`` (0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Shard:
        """The shard torchrun describes in ``RANK``/``WORLD_SIZE`` (0 of 1 without it)."""
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            raise ValueError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE="
                             f"{os.environ.get('WORLD_SIZE')!r} are not integers") from None
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
        return cls(rank, world_size)


def rank_device(device: str) -> str:
    """``device`` for this process: a bare ``cuda`` under torchrun is the rank's own GPU,
    ``cuda:LOCAL_RANK`` (every rank on ``cuda:0`` would share one device); anything else
    is kept."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def shard_files(files: list[str], shard: Shard) -> list[tuple[int, str]]:
    """``(global file index, path)`` of the files this shard reads: every ``world_size``-th,
    so each file is read by exactly one rank."""
    return [(index, path) for index, path in enumerate(files) if index % shard.world_size == shard.rank]


def video_order(file_index: int, record_index: int) -> int:
    """The global tie key of a record: its position in the single-process read order."""
    if not 0 <= record_index < 1 << 32:
        raise ValueError(f"record index {record_index} does not fit the 32-bit order field")
    return (file_index << 32) | record_index


def gather(payload, shard: Shard) -> list | None:
    """Every rank's ``payload`` (any picklable object) on rank 0, in rank order; None on
    the others.

    Joins (or makes) the gloo process group that torchrun's environment describes.
    """
    if shard.world_size == 1:
        return [payload]
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    gathered: list | None = [None] * shard.world_size if shard.is_root else None
    dist.gather_object(payload, gathered, dst=0)
    return gathered


def broadcast(payload, shard: Shard):
    """Rank 0's ``payload`` (any picklable object) on every rank; the others pass None."""
    if shard.world_size == 1:
        return payload
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    box = [payload if shard.is_root else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish(shard: Shard) -> None:
    """Leave the process group (after the last collective)."""
    if shard.world_size == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["Shard", "finish", "gather", "shard_files", "video_order"]
