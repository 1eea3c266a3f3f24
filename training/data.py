"""torch loading of :mod:`modloc.training.datasets` streams.

Batches are built inside the DataLoader workers (one IPC message per batch, not per
example) and cross to the main process as tensors that share the numpy buffers; features
stay ``torch.uint8`` until the model dequantizes them on its device.

Worker ``w`` of ``n`` reads part ``w`` of ``n`` of the dataset's own shard
(:meth:`modloc.training.datasets.VideoLevelDataset.subshard`), so ``shard=(rank, world)`` on the
dataset composes with workers and every example is read once per epoch overall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from modloc.training.datasets import Batch, FrameDataset


@dataclass(eq=False)
class TorchBatch:
    """:class:`modloc.training.datasets.Batch` as tensors.

    Attributes:
        video_ids: ``B`` video ids.
        features: ``(B, M, 1152)`` torch.uint8; zero at frames ``>= num_frames[b]``.
        num_frames: ``(B,)`` torch.int32 valid frames per row.
        labels: ``(B, C)`` torch.float32.
        label_weights: ``(B, C)`` torch.float32 (segment mode) or None.
        segment_starts: ``(B,)`` torch.int64 (segment mode) or None.
    """

    video_ids: list[str]
    features: torch.Tensor
    num_frames: torch.Tensor
    labels: torch.Tensor
    label_weights: torch.Tensor | None = None
    segment_starts: torch.Tensor | None = None

    @classmethod
    def from_numpy(cls, batch: Batch) -> TorchBatch:
        """Zero-copy: the tensors share the batch's arrays."""
        return cls(
            video_ids=batch.video_ids,
            features=torch.from_numpy(batch.features),
            num_frames=torch.from_numpy(batch.num_frames),
            labels=torch.from_numpy(batch.labels),
            label_weights=_optional(batch.label_weights, torch.from_numpy),
            segment_starts=_optional(batch.segment_starts, torch.from_numpy),
        )

    def __len__(self) -> int:
        return len(self.video_ids)

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> TorchBatch:
        """A batch with ``function`` applied to every tensor (ids unchanged)."""
        return TorchBatch(
            video_ids=self.video_ids,
            features=function(self.features),
            num_frames=function(self.num_frames),
            labels=function(self.labels),
            label_weights=_optional(self.label_weights, function),
            segment_starts=_optional(self.segment_starts, function),
        )

    def pin_memory(self) -> TorchBatch:
        """Page-locked copy; the DataLoader's pin-memory thread calls this."""
        return self.map(torch.Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TorchBatch:
        return self.map(lambda tensor: tensor.to(device, non_blocking=non_blocking))


def _optional(value, function):
    return None if value is None else function(value)


class BatchStream(IterableDataset):
    """An ``IterableDataset`` of :class:`TorchBatch` over an engine dataset.

    Each iteration reads ``epochs`` epochs (None: forever) and advances the epoch number,
    so successive passes reshuffle. Workers advance their own copy of the counter: with
    persistent workers (what :func:`make_loader` makes) that is all it takes, and
    :meth:`set_epoch` only acts before their first pass; with non-persistent workers
    (fresh copies each pass) call :meth:`set_epoch` before each pass, as with
    ``DistributedSampler``.
    """

    def __init__(
        self,
        dataset: FrameDataset,
        batch_size: int,
        drop_last: bool = False,
        epochs: int | None = 1,
    ):
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epochs = epochs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[TorchBatch]:
        info = get_worker_info()
        dataset = self.dataset if info is None else self.dataset.subshard(info.id, info.num_workers)
        start = self.epoch
        if self.epochs is not None:
            self.epoch += self.epochs
        for batch in dataset.batches(self.batch_size, self.drop_last, self.epochs, start_epoch=start):
            yield TorchBatch.from_numpy(batch)


def make_loader(
    dataset: FrameDataset,
    batch_size: int,
    num_workers: int = 0,
    drop_last: bool = False,
    epochs: int | None = 1,
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A DataLoader of :class:`TorchBatch` (``batch_size=None``: workers yield whole batches).

    Each worker batches its own part, so with ``drop_last=False`` a pass may end with up to
    ``num_workers`` short batches, and with ``drop_last=True`` each worker drops its own
    remainder. ``pin_memory`` defaults to "CUDA is available"; workers are persistent.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    stream = BatchStream(dataset, batch_size, drop_last, epochs)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    workers = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers else {}
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **workers)
