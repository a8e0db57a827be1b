"""numpy's BLAS runs on one thread in the processes that train and evaluate."""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_info

from fedlora.runtime.threads import single_threaded_blas


def test_single_threaded_blas_limits_numpys_blas_and_nothing_else():
    before = {p["filepath"]: p["num_threads"] for p in threadpool_info()
              if "numpy" not in p["filepath"]}
    threads = torch.get_num_threads()

    single_threaded_blas()

    after = threadpool_info()
    numpy_blas = [p for p in after if p["user_api"] == "blas" and "numpy" in p["filepath"]]
    assert numpy_blas and all(p["num_threads"] == 1 for p in numpy_blas)
    assert {p["filepath"]: p["num_threads"] for p in after
            if "numpy" not in p["filepath"]} == before
    assert torch.get_num_threads() == threads
