"""The seeded visit schedule every crop stream follows, and the re-batching of visits into training batches.

Visit ``v`` (of ``world`` processes together) reads volume slot ``v % V`` of epoch ``v // V``'s seeded permutation of
the ``V`` volumes; rank ``r`` reads visits r, r + world, r + 2·world, ... (disjoint volumes in each epoch). Each visit
gives a fixed number of crops drawn from a generator seeded by ``(seed, v)``. Any step's batch is therefore a pure
function of the seed and the step, which makes ``--resume`` exact without saving loader state.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ctmae.runtime.loader import PREFETCH, STALL_S, iterate_workers


def visit_volume(num_volumes: int, seed: int, visit: int) -> int:
    """Index of the volume read at global visit ``visit``: slot ``visit % V`` of epoch ``visit // V``'s permutation."""
    epoch, slot = divmod(visit, num_volumes)
    order = torch.randperm(num_volumes, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return int(order[slot])


def global_visit(local_visit: int, rank: int, world: int) -> int:
    """The global visit that this rank's ``local_visit``-th read is (rank r reads r, r + world, ...)."""
    return local_visit * world + rank


def visit_batches(
    visits: Dataset, per_visit: int, batch_size: int, start_step: int, workers: int | None
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless batches from a dataset of visits, continuing exactly where step ``start_step`` would be.

    Args:
        visits: item ``v`` is a tuple of tensors (N, ...) with N = ``per_visit`` crops (e.g. images and labels).
        per_visit: crops per visit.
        batch_size: crops per yielded batch (per process).
        start_step: batches already consumed by earlier steps (resume): they are skipped without being read.
        workers: DataLoader processes (0 or None: read in this process); they ignore stop signals, and a wait for
            them ends on a stop signal or a stall (``ctmae.runtime.loader``).

    Yields:
        Tuples of tensors (B, ...), B = ``batch_size``.
    """
    first_visit, skip = divmod(start_step * batch_size, per_visit)
    workers = workers or 0
    loader = DataLoader(
        visits,
        batch_size=None,
        sampler=itertools.count(first_visit),  # endless: visit indices from here on
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH if workers > 0 else None,
    )
    pending: list[tuple[torch.Tensor, ...]] = []
    have = 0
    for item in iterate_workers(loader, stall_s=STALL_S):
        if skip:
            item, skip = tuple(x[skip:] for x in item), 0
        pending.append(item)
        have += len(item[0])
        while have >= batch_size:
            stacked = tuple(torch.cat(parts) for parts in zip(*pending))
            yield tuple(x[:batch_size] for x in stacked)
            pending, have = [tuple(x[batch_size:] for x in stacked)], have - batch_size
