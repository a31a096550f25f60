"""The seeded stream of random training crops for pretraining, cut straight from the compressed cache.

Crops follow ``ctmae.preprocess.visit_order``'s visits: any step's batch is a pure function of the seed and the step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ctmae.io.discovery import VolumeSource
from ctmae.mae.config import DataConfig
from ctmae.preprocess.cache import CachedVolume, VolumeCache
from ctmae.preprocess.config import PreprocessConfig
from ctmae.preprocess.visit_order import global_visit, visit_batches, visit_volume


class CropVisits(Dataset):
    """Item ``v`` is visit ``v`` of the seeded schedule: ``crops_per_volume`` random crops (N, 1, c, c, c).

    Crops are cut straight from the cache, so a visit decompresses only the blocks its crops touch, not the volume
    (MONAI's RandSpatialCropSamplesd would first load the whole array), straight into the batch as float32 0..1.
    Offsets are uniform over the valid range; with ``flip`` each crop is mirrored left-right (RAS x) with
    probability 1/2 (a chest's left and right halves are near mirror images: twice the anatomy to learn from); with
    ``zoom`` each crop is a cube of ``crop``·s voxels, s log-uniform in [1/(1 + zoom), 1 + zoom], resampled
    trilinearly to ``crop``: the anatomy at other sizes, as other patients bring it; with ``contrast`` each crop's
    intensities x (0..1) become x^g, g log-uniform in [1/(1 + contrast), 1 + contrast]: soft tissue brighter or
    darker, as other scanners and contrast agent make it, while air (0) and the top of the window (1) stay put.
    With ``context`` voxels each crop comes with that much of the scan around it (scaled, bent and mirrored with it),
    for the fills the decoder corrects: (N, 1, c + 2·context, ...), NaN where the context lies beyond the scan.
    """

    def __init__(
        self,
        sources: Sequence[VolumeSource],
        pre: PreprocessConfig,
        cfg: DataConfig,
        seed: int,
        rank: int = 0,
        world: int = 1,
        context: int = 0,
    ) -> None:
        self.sources, self.cfg, self.seed, self.rank, self.world = list(sources), cfg, seed, rank, world
        self.crop, self.context, self.cache = pre.crop, context, VolumeCache(pre)

    def __len__(self) -> int:
        return 2**62  # endless; the sampler decides which visits are read

    def __getitem__(self, local_visit: int) -> tuple[torch.Tensor]:
        visit = global_visit(local_visit, self.rank, self.world)
        source = self.sources[visit_volume(len(self.sources), self.seed, visit)]
        volume = self.cache.load(source)  # (X, Y, Z), each edge >= crop
        rng = np.random.default_rng([self.seed, visit])
        c, e = self.crop, self.crop + 2 * self.context
        crops = np.empty((self.cfg.crops_per_volume, 1, e, e, e), np.float32)  # (N, 1, e, e, e)
        for crop in crops:
            edge = self._edge(rng, volume.shape)
            start = [int(rng.integers(0, n - edge + 1)) for n in volume.shape]  # x, y, z
            if self.context:
                crop[0] = self._with_context(volume, start, edge)
            elif edge == c:
                volume.read(start, (c, c, c), out=crop[0])  # decompresses only the blocks this crop touches
            else:  # a cube of `edge` voxels, resampled to c: the anatomy scaled by c / edge
                cube = np.empty((edge, edge, edge), np.float32)
                volume.read(start, cube.shape, out=cube)
                crop[0] = F.interpolate(torch.from_numpy(cube)[None, None], size=(c, c, c), mode="trilinear")[0, 0]
            if self.cfg.contrast:  # drawn only when asked, so runs without it keep their crops
                gamma = float(np.exp(rng.uniform(-1.0, 1.0) * np.log1p(self.cfg.contrast)))
                np.power(crop, gamma, out=crop)
            if self.cfg.flip and rng.random() < 0.5:
                crop[0] = crop[0, ::-1].copy()
        return (torch.from_numpy(crops),)

    def _with_context(self, volume: CachedVolume, start: list[int], edge: int) -> np.ndarray:
        """The cube of ``edge`` voxels at ``start`` with ``context`` (scaled like it) around it, resampled to (e, e,
        e), e = crop + 2·context; NaN beyond the scan."""
        margin = round(self.context * edge / self.crop)
        outer, box = edge + 2 * margin, [a - margin for a in start]
        cube = np.full((outer, outer, outer), np.nan, np.float32)
        lo = [max(0, a) for a in box]
        hi = [min(n, a + outer) for a, n in zip(box, volume.shape)]
        inside = tuple(slice(a - b, h - b) for a, b, h in zip(lo, box, hi))
        cube[inside] = volume.read(lo, [h - a for a, h in zip(lo, hi)])
        e = self.crop + 2 * self.context
        if outer == e:
            return cube
        # resampled with the share of scan voxels in each new voxel, normalised, so no NaN spreads into the crop
        # (whose rounded edge may reach a voxel beyond the scan): (2, e, e, e)
        both = torch.from_numpy(np.stack([np.nan_to_num(cube), np.isfinite(cube).astype(np.float32)]))
        values, share = F.interpolate(both[None], size=(e, e, e), mode="trilinear")[0]
        return torch.where(share > 1e-3, values / share.clamp_min(1e-3), torch.nan).numpy()

    def _edge(self, rng: np.random.Generator, shape: Sequence[int]) -> int:
        """Edge of the cube to read for one crop: ``crop``, or with ``zoom`` a log-uniform scale of it that fits."""
        if not self.cfg.zoom:
            return self.crop
        scale = float(np.exp(rng.uniform(-1.0, 1.0) * np.log1p(self.cfg.zoom)))
        return max(2, min(round(self.crop * scale), *shape))


def crop_batches(
    sources: Sequence[VolumeSource],
    pre: PreprocessConfig,
    cfg: DataConfig,
    seed: int,
    batch_size: int,
    start_step: int = 0,
    rank: int = 0,
    world: int = 1,
    context: int = 0,
) -> Iterator[torch.Tensor]:
    """Endless batches (B, 1, c, c, c) of crops, continuing exactly where step ``start_step`` would be; with
    ``context``, (B, 1, c + 2·context, ...): each crop with the scan around it (``CropVisits``).

    Under ``world`` processes, rank ``r`` reads visits r, r + world, r + 2·world, ...: disjoint volumes in each
    epoch. When ``crops_per_volume`` equals the per-rank batch, the global batch of a step holds the same crops
    as a single process with ``world`` times the batch.
    """
    visits = CropVisits(sources, pre, cfg, seed, rank, world, context)
    for (crops,) in visit_batches(visits, cfg.crops_per_volume, batch_size, start_step, cfg.workers):
        yield crops
