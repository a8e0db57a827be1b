"""Thread settings of the processes that train and evaluate (ClientApp, ServerApp)."""

from __future__ import annotations

import functools


@functools.cache
def single_threaded_blas() -> None:
    """Run numpy's own BLAS (the OpenBLAS in numpy's wheel) on one thread in this process, once.

    After a call, OpenBLAS's worker threads keep spinning for a while before they sleep; next
    to torch's own OpenMP threads on a small machine they hold the cores torch's next operation
    waits for. Alternating a (384, 64) @ (64, 384) numpy product with a torch matmul took 85-92
    ms per pair (median) with OpenBLAS's default 2 threads against 32 ms with 1, on the 2-core
    machine of benchmarks/RESULTS.md. The numpy work of a round (aggregation, norms, base
    merges) is small. Only BLAS libraries inside numpy's installation are limited: torch's
    threads, and a BLAS that torch might share with numpy elsewhere, are left alone.
    """
    import numpy  # noqa: F401 (loads numpy's BLAS, so that threadpoolctl finds it)
    from threadpoolctl import ThreadpoolController

    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        if "numpy" in lib.filepath:
            lib.set_num_threads(1)
