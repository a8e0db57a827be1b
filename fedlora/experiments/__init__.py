"""Aggregation-strategy experiments: sweep specs, the runner, baselines, attacks, statistics,
trackers and reports."""
