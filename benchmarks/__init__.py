"""Performance comparisons against peer implementations.

Each module exposes ``run(quick: bool = False) -> dict``.
"""
