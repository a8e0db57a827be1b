"""Under DP the round's sample is unpredictable (OS entropy), yet recorded so resume is exact."""

from __future__ import annotations

from fedlora import config
from fedlora.federation import checkpoint
from server.strategy import FederatedLora, NodeInfo
from tests.fl_harness import tiny_config
from tests.test_fuzz_replies import _task_identity, make_glob  # noqa: F401 — the fixture

NODES = [NodeInfo(node_id=100 + p, partition_id=p, rank=4) for p in range(60)]


def _strategy(**extra) -> FederatedLora:
    flat = tiny_config(**{"num-train-nodes": 20, "seed": 7, **extra})
    return FederatedLora(config.from_flat(flat), make_glob(4), lambda _: None, lambda _: None)


def _draws(strategy: FederatedLora) -> list[list[int]]:
    return [[n.partition_id for n in strategy.sample(NODES, r)] for r in range(1, 11)]


def test_under_dp_the_public_seed_does_not_predict_the_sample():
    first, second = _draws(_strategy(dp_mode="central")), _draws(_strategy(dp_mode="central"))

    assert all(len(d) == 20 for d in first)
    # same seed, same rounds: 10 draws of 20 of 60 coincide with probability ~ 1e-160
    assert first != second
    # what anyone with the run config would compute: (seed, round) as without DP
    assert first != _draws(_strategy())


def test_without_dp_the_sample_stays_a_function_of_seed_and_round():
    assert _draws(_strategy()) == _draws(_strategy())


def test_the_dp_sample_is_recorded_and_restored_from_the_checkpoint(tmp_path):
    strategy = _strategy(dp_mode="central")
    drawn = _draws(strategy)
    assert _draws(strategy) == drawn  # a round asked again gets the sample it drew
    strategy.save_checkpoint(tmp_path, 10)

    resumed = _strategy(dp_mode="central")
    resumed.restore(checkpoint.load_latest(tmp_path))

    assert _draws(resumed) == drawn
    assert resumed.dp_samples == strategy.dp_samples
