"""An endless shuffling sampler that can start at any position of its stream, for resuming training exactly.

The stream is epoch 0's order, then epoch 1's, ... where epoch e's order is `randperm(n)` from a generator seeded
with (seed, e). Any position can therefore be recomputed from three integers, and resuming skips already-seen
*indices* without loading or encoding the samples behind them. The training loop decides how many batches it takes;
it knows the position from the number of batches it consumed (a loader may fetch one batch ahead, so the sampler's
own progress is not the loop's).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, size: int, seed: int, start: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.start = start

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.size)
        while True:
            yield from self.order(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        return self.size
