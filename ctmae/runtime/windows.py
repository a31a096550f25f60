"""MONAI's sliding-window inference, watched: a stop signal ends it between batches of windows, and a callback hears
how many windows of the scan are done.

``sliding_window_inference`` runs every window of a volume in one call, minutes on a CPU for a large scan. The
predictor it calls once per batch of windows is the one place in between: ``watch`` wraps a predictor so that each
call first checks for a stop signal (``ctmae.runtime.signals.check_stop`` raises ``Stopped``, which leaves the
call with nothing half-written) and then reports the windows done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval
from monai.utils import ensure_tuple_rep

from ctmae.runtime.signals import check_stop

OnWindows = Callable[[int, int], None]  # (windows done, windows of the scan)


def window_count(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows ``sliding_window_inference`` visits over an image (batch 1) of ``image_size``: MONAI's own
    scan intervals and slices, on the image as MONAI pads it (to at least ``roi_size`` along each axis)."""
    size = tuple(max(n, r) for n, r in zip(image_size, roi_size))
    intervals = _get_scan_interval(size, roi_size, len(roi_size), ensure_tuple_rep(overlap, len(roi_size)))
    return len(dense_patch_slices(size, roi_size, intervals))


def watch(predictor: Callable[..., Any], total: int, on_windows: OnWindows | None = None) -> Callable[..., Any]:
    """``predictor`` for ``sliding_window_inference`` that raises ``Stopped`` before a batch when a stop signal
    came, and calls ``on_windows(done, total)`` after each batch.

    Args:
        predictor: takes a batch of windows (B, C, ...) first, as MONAI calls it (other arguments pass through).
        total: the windows of the whole call (``window_count``).
        on_windows: progress callback, or None.
    """
    done = 0

    def watched(windows: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal done
        check_stop()
        out = predictor(windows, *args, **kwargs)
        done += int(windows.shape[0])
        if on_windows:
            on_windows(done, total)
        return out

    return watched
