"""``ctmae.embed``: one embedding per scan from a pretrained encoder, streamed into a resumable table."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ctmae.api.common import SILENT, OptionError, Reporter


@dataclass(frozen=True)
class Embedding:
    """What ``embed`` wrote into its table, and what it left out."""

    out: Path  # the table: .npz, .csv or .parquet (ctmae.infer.embed_outputs), sorted by scan id
    embedded: int  # scans embedded by this call
    resumed: int  # scans already in the table (or its journal) from an earlier call, not embedded again
    rows: int  # rows in the table now
    skipped: tuple[str, ...]  # inputs left out, one line each
    warnings: tuple[str, ...]  # scans unlike the checkpoint's preprocessing or its training scans (shift score)
    stopped: str | None  # the stop signal that ended the work between windows or scans (the same call continues)


def embed(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    pool: str = "mean",
    tokens: str | os.PathLike | None = None,
    batch_size: int = 2,
    device: str = "auto",
    workers: int = 0,
    reporter: Reporter = SILENT,
) -> Embedding:
    """Embed every scan among ``inputs`` not yet in ``out`` with the encoder of ``checkpoint``; (re)write ``out``.

    The encoder sees the whole scan, unmasked, in overlapping windows; its token map is pooled to one vector per
    scan (``ctmae.infer.embed``). A call killed or stopped part way loses at most the scan in progress: the same call
    again skips the scans already embedded.

    Args:
        checkpoint: a ``.pt`` written by ``ctmae pretrain``, or an export folder written by ``ctmae export``.
        inputs: files, folders (searched recursively), DICOM series folders or .txt/.csv lists of them.
        out: the table, .npz, .csv or .parquet (the latter needs pyarrow).
        pool: mean or max over all tokens of the scan.
        tokens: a folder for each scan's token map (D, gx, gy, gz) .npy and its RAS affine .json, or None.
        batch_size: windows per forward pass.
        device: auto, cpu or cuda.
        workers: data-loader processes that read and preprocess the next scans (0: in this process).
        reporter: hears the scans done, the sliding windows, the warnings and skipped inputs.

    Raises:
        OptionError: a pooling or output suffix ctmae cannot do, or an output it cannot write (checked first).
        CheckpointError: the checkpoint or export is unusable. InputError: no scan could be embedded.
    """
    from ctmae.infer.embed import check_options
    from ctmae.infer.embed import embed as run_embed
    from ctmae.io.checks import InputError
    from ctmae.io.discovery import skipped_only
    from ctmae.runtime.signals import pending_stop
    from ctmae.share.load import load_encoder_model

    try:
        check_options(out, pool, tokens)
    except ValueError as e:
        raise OptionError(str(e)) from None
    loaded = load_encoder_model(checkpoint, device)
    loaded = dataclasses.replace(loaded, cfg=loaded.cfg.replace(data={"workers": workers}))
    result = run_embed(
        loaded,
        [str(p) for p in inputs],
        out,
        pool=pool,
        tokens_dir=tokens,
        batch_size=batch_size,
        on_start=lambda n: reporter.start("embedding", n),
        on_scan=lambda status: reporter.advance(),
        on_windows=reporter.windows,
    )
    reporter.skipped(result["skipped"])
    for line in result["warnings"]:  # the checkpoint's preprocessing contract (ctmae.preprocess.contract), shift
        reporter.warn(line)
    stopped = result["stopped"] or pending_stop()  # a signal after the last scan still says the work was stopped
    if not stopped and result["embedded"] + result["resumed"] == 0:
        raise InputError(f"no scan embedded ({len(skipped_only(result['skipped']))} skipped)")
    return Embedding(
        out=Path(out),
        embedded=result["embedded"],
        resumed=result["resumed"],
        rows=result["rows"],
        skipped=tuple(result["skipped"]),
        warnings=tuple(result["warnings"]),
        stopped=stopped,
    )
