"""Performance comparisons against peer implementations (``python -m benchmarks``).

Each benchmark module exposes ``ID``, ``TITLE`` and ``run(quick: bool = False) -> dict``
returning :func:`benchmarks.common.result`'s object; see ``benchmarks/README.md``.
"""
