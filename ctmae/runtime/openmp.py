"""OpenMP threads that sleep, not spin, while they wait: set before torch loads its OpenMP runtime.

PyTorch's OpenMP threads (GNU libgomp in the pip wheels) spin for up to 300,000 iterations before they sleep.
Beside other busy processes they spin on cores those processes need, and a run falls far below its fair share
(measured in BENCHMARKS.md, "The demo on a shared CPU": about twice the speed beside busy processes, about 12 % less
alone on the tiny CPU demo; a short spin of 5000 measured no better than none). The runtime reads these variables
once, when it is loaded, so the command line sets them on import, before anything imports torch; data-loader workers
(forked) and torchrun's ranks (which run ``python -m ctmae``) inherit them. A value the user has set is kept, so
``OMP_WAIT_POLICY=ACTIVE`` (or unsetting nothing and exporting ``GOMP_SPINCOUNT``) brings the spin back for a machine
that runs nothing else.
"""

from __future__ import annotations

import os

WAIT_POLICY = {
    "OMP_WAIT_POLICY": "PASSIVE",  # GNU libgomp (PyTorch's pip wheels) and LLVM's libomp
    "KMP_BLOCKTIME": "0",  # Intel's libiomp5 (MKL-linked builds): sleep at once after a parallel region (not measured)
}


def sleep_while_waiting() -> None:
    """Set the OpenMP wait policy in this process's environment unless the user set it."""
    for name, value in WAIT_POLICY.items():
        os.environ.setdefault(name, value)


sleep_while_waiting()
