"""End-to-end rounds: the secure sum, dropouts at every stage, aborts and rejections."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedlora.privacy.secagg import (
    KeyAdvertisement,
    MaskedInput,
    ProtocolError,
    PublicKeys,
    SecAggAborted,
    SecAggConfig,
    SecAggServer,
    ShareBundle,
    Stage,
)
from fedlora.privacy.secagg.graph import ring_order

from .helpers import Federation, assert_matches_plain_sum, make_federation, run_round

CONFIG = SecAggConfig(clip_range=2.0, max_weight=1000.0)
FULL = 10_000  # more neighbours than clients: full SecAgg


def _config(neighbours: int | None) -> SecAggConfig:
    return SecAggConfig(neighbours=neighbours, clip_range=2.0, max_weight=1000.0)


def _tolerated(fed: Federation) -> int:
    """Dropouts any round survives: the share group minus the threshold."""
    group = fed.config.resolve(len(fed.ids))
    return group.group_size - group.threshold


# (clients, neighbours): full graphs and sparse ones, odd and even degrees
GRAPHS = [(3, FULL), (5, FULL), (8, 4), (13, 5), (20, 6), (20, FULL)]


@pytest.mark.parametrize(("num_clients", "neighbours"), GRAPHS)
def test_secure_sum_without_dropouts(num_clients: int, neighbours: int) -> None:
    # Prepare
    fed = make_federation(num_clients, _config(neighbours))

    # Execute
    result = run_round(fed)

    # Assert
    assert result.contributors == frozenset(fed.ids)
    assert all(not dropped for dropped in result.dropped.values())
    assert_matches_plain_sum(fed, result)
    expected_mean = sum(fed.weights[n] * np.clip(fed.vectors[n], -2, 2) for n in fed.ids) / sum(
        fed.weights.values()
    )
    np.testing.assert_allclose(result.mean(), expected_mean, atol=1e-5)


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize(("num_clients", "neighbours"), GRAPHS)
def test_secure_sum_with_tolerated_dropouts(
    num_clients: int, neighbours: int, stage: Stage
) -> None:
    # Prepare: drop as many clients as every share group can lose
    fed = make_federation(num_clients, _config(neighbours), seed=num_clients + int(stage))
    count = _tolerated(fed) if stage != Stage.ADVERTISE_KEYS else num_clients - 2
    dropped = set(fed.ids[1 : 1 + count])

    # Execute
    result = run_round(fed, {stage: dropped})

    # Assert
    assert result.dropped[stage] == dropped
    if stage == Stage.UNMASK:  # their masked inputs arrived, so they count
        assert result.contributors == frozenset(fed.ids)
    else:
        assert result.contributors == frozenset(fed.ids) - dropped
    assert_matches_plain_sum(fed, result)


def test_dropouts_at_several_stages_in_one_round() -> None:
    # Prepare: 20 clients, full graph (t = 11 of 20): lose 2, 2, 2 and 2
    fed = make_federation(20, _config(FULL), seed=7)
    ids = fed.ids
    drops = {
        Stage.ADVERTISE_KEYS: {ids[0], ids[1]},
        Stage.SHARE_KEYS: {ids[2], ids[3]},
        Stage.MASKED_INPUT: {ids[4], ids[5]},
        Stage.UNMASK: {ids[6], ids[7]},
    }

    # Execute
    result = run_round(fed, drops)

    # Assert
    assert result.contributors == frozenset(ids[6:])
    assert dict(result.dropped) == drops
    assert_matches_plain_sum(fed, result)


def test_round_survives_client_restarts_between_stages() -> None:
    # Prepare: every client is rebuilt from its snapshot before each stage
    fed = make_federation(8, _config(4), restore_between_stages=True)

    # Execute
    result = run_round(fed, {Stage.MASKED_INPUT: {fed.ids[3]}})

    # Assert
    assert_matches_plain_sum(fed, result)


def test_fixed_point_step_shrinks_the_error_for_tiny_updates() -> None:
    # Prepare: values far below the clip range still survive quantisation
    config = SecAggConfig(clip_range=1.0, max_weight=1.0)
    fed = make_federation(5, config)
    fed.vectors = {n: (v * 1e-4).astype(np.float32) for n, v in fed.vectors.items()}
    fed.weights = dict.fromkeys(fed.ids, 1.0)

    # Execute
    result = run_round(fed)

    # Assert
    assert_matches_plain_sum(fed, result)
    assert result.error_bound < 3e-8  # 5 clients, levels ⌊(2^31 − 1) / (5 · 2^1)⌋


@pytest.mark.parametrize("stage", list(Stage))
def test_below_threshold_at_any_stage_aborts_without_a_sum(stage: Stage) -> None:
    # Prepare: 5 clients, full graph, explicit t = 3; 3 dropouts leave 2 < t
    fed = make_federation(5, SecAggConfig(threshold=3, neighbours=4, clip_range=2.0))
    dropped = set(fed.ids[:3])

    # Execute
    with pytest.raises(SecAggAborted) as caught:
        run_round(fed, {stage: dropped})

    # Assert
    assert caught.value.stage == stage.label
    assert caught.value.reason == "BELOW_THRESHOLD"
    assert "keep the previous global model" in str(caught.value)
    assert fed.server.aborted and fed.server.stage is None
    with pytest.raises(ProtocolError, match="ABORTED"):
        fed.server.collect_unmask_responses([])


def test_a_thin_neighbourhood_at_stage_two_leaves_that_client_out_not_the_round() -> None:
    # Prepare: 20 clients, k = 4 (t = 3); a survivor loses 3 of its 4 neighbours at stage 2
    fed = make_federation(20, _config(4))
    directory = fed.server.collect_keys(fed.clients[n].advertise_keys() for n in fed.ids)
    victim = fed.ids[0]
    neighbours = sorted(fed.server.graph[victim])
    relays = fed.server.collect_shares(fed.clients[n].share_keys(directory) for n in fed.ids)
    senders = [n for n in fed.ids if n not in neighbours[:3]]
    inputs = [
        fed.clients[n].mask_input(relays[n], fed.vectors[n], fed.weights[n]) for n in senders
    ]

    # Execute: its self-mask could be rebuilt by 2 < t holders, so its input is left out
    requests = fed.server.collect_masked_inputs(inputs)
    result = fed.server.collect_unmask_responses(
        fed.clients[n].unmask(request) for n, request in requests.items()
    )

    # Assert
    left_out = {r.node for r in fed.server.rejections if r.reason == "TOO_FEW_NEIGHBOURS"}
    assert victim in left_out  # (a client sharing two of the lost neighbours may follow it)
    assert result.contributors == set(senders) - left_out
    assert len(result.contributors) >= 14
    assert_matches_plain_sum(fed, result)


def test_thin_neighbourhood_after_sharing_is_pruned_not_fatal() -> None:
    # Prepare: 20 clients, k = 4 (t = 3); 3 ring neighbours of one client drop at stage 1
    fed = make_federation(20, _config(4), seed=3)
    order = ring_order(fed.ids, fed.server.graph_seed)
    victim = order[10]
    dropped = {order[8], order[9], order[11]}

    # Execute
    result = run_round(fed, {Stage.SHARE_KEYS: dropped})

    # Assert
    assert victim not in result.contributors
    assert result.dropped[Stage.SHARE_KEYS] == dropped | {victim}
    pruned = [r for r in fed.server.rejections if r.reason == "TOO_FEW_NEIGHBOURS"]
    assert [r.node for r in pruned] == [victim]
    assert_matches_plain_sum(fed, result)


def test_adaptive_threshold_follows_the_clients_that_advertised_keys() -> None:
    # Prepare: threshold=None is a majority of the group formed at stage 0
    fed = make_federation(5, _config(FULL))

    # Execute
    result = run_round(fed, {Stage.ADVERTISE_KEYS: set(fed.ids[:3])})

    # Assert
    assert fed.server.group is not None and fed.server.group.threshold == 2
    assert len(result.contributors) == 2


def test_duplicate_participants_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        SecAggServer(CONFIG, 1, [5, 6, 5], vector_size=4)


@pytest.mark.parametrize(
    ("participants", "vector_size", "match"),
    [([-1, 2], 4, "node ids"), ([1, 2], 0, "vector_size"), ([1, True], 4, "node ids")],
)
def test_invalid_server_arguments(participants: list, vector_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SecAggServer(CONFIG, 1, participants, vector_size=vector_size)


def test_duplicate_masked_input_drops_the_sender() -> None:
    # Prepare
    fed = make_federation(6, _config(FULL))
    directory = fed.server.collect_keys(fed.clients[n].advertise_keys() for n in fed.ids)
    relays = fed.server.collect_shares(fed.clients[n].share_keys(directory) for n in fed.ids)
    inputs = [fed.clients[n].mask_input(relays[n], fed.vectors[n], 10.0) for n in fed.ids]
    twice = inputs[0]

    # Execute
    requests = fed.server.collect_masked_inputs([*inputs, twice])
    result = fed.server.collect_unmask_responses(
        fed.clients[n].unmask(requests[n]) for n in requests
    )

    # Assert
    assert twice.sender not in result.contributors
    assert [(r.node, r.reason) for r in fed.server.rejections] == [(twice.sender, "DUPLICATE")]
    fed.weights = dict.fromkeys(fed.ids, 10.0)
    assert_matches_plain_sum(fed, result)


def test_stale_round_reply_is_ignored_but_the_fresh_one_counts() -> None:
    # Prepare
    fed = make_federation(4, _config(FULL), server_round=7)
    adverts = [fed.clients[n].advertise_keys() for n in fed.ids]
    stale = KeyAdvertisement(6, adverts[0].sender, adverts[0].keys)

    # Execute
    directory = fed.server.collect_keys([stale, *adverts])

    # Assert
    assert set(directory.public_keys) == set(fed.ids)
    assert [(r.node, r.reason) for r in fed.server.rejections] == [(stale.sender, "WRONG_ROUND")]


def test_wrong_round_only_reply_counts_as_dropout() -> None:
    # Prepare
    fed = make_federation(5, _config(FULL), server_round=2)
    directory = fed.server.collect_keys(fed.clients[n].advertise_keys() for n in fed.ids)
    relays = fed.server.collect_shares(fed.clients[n].share_keys(directory) for n in fed.ids)
    inputs = [fed.clients[n].mask_input(relays[n], fed.vectors[n], 1.0) for n in fed.ids]
    inputs[1] = MaskedInput(1, inputs[1].sender, inputs[1].masked)

    # Execute
    requests = fed.server.collect_masked_inputs(inputs)
    result = fed.server.collect_unmask_responses(
        fed.clients[n].unmask(requests[n]) for n in requests
    )

    # Assert
    assert result.dropped[Stage.MASKED_INPUT] == {inputs[1].sender}
    fed.weights = dict.fromkeys(fed.ids, 1.0)
    assert_matches_plain_sum(fed, result)


def test_unexpected_senders_and_malformed_replies_are_rejected() -> None:
    # Prepare
    fed = make_federation(5, _config(FULL))
    adverts = [fed.clients[n].advertise_keys() for n in fed.ids]
    intruder = KeyAdvertisement(1, 999, adverts[0].keys)
    bad_key = KeyAdvertisement(1, adverts[1].sender, PublicKeys(b"short", adverts[1].keys.mask))
    replies: list[Any] = [intruder, bad_key, *adverts[2:], "garbage"]
    directory = fed.server.collect_keys(replies)
    bundles = [fed.clients[n].share_keys(directory) for n in directory.public_keys]
    first = bundles[0]
    misaddressed = ShareBundle(1, first.sender, dict(list(first.ciphertexts.items())[:-1]))

    # Execute
    fed.server.collect_shares([misaddressed, *bundles[1:]])

    # Assert
    reasons = {(r.stage, r.reason) for r in fed.server.rejections}
    assert reasons == {
        (Stage.ADVERTISE_KEYS, "UNEXPECTED_SENDER"),
        (Stage.ADVERTISE_KEYS, "MALFORMED"),
        (Stage.SHARE_KEYS, "MALFORMED"),
    }
    assert fed.server.dropped[Stage.ADVERTISE_KEYS] == {adverts[0].sender, adverts[1].sender}
    assert first.sender not in fed.server.active


def test_copied_public_keys_are_rejected() -> None:
    # Prepare
    fed = make_federation(5, _config(FULL))
    adverts = [fed.clients[n].advertise_keys() for n in fed.ids]
    adverts[1] = KeyAdvertisement(1, adverts[1].sender, adverts[0].keys)

    # Execute
    directory = fed.server.collect_keys(adverts)

    # Assert
    assert set(directory.public_keys) == set(fed.ids[2:])
    assert {r.reason for r in fed.server.rejections} == {"DUPLICATE_KEY"}


def test_malformed_masked_input_is_rejected() -> None:
    # Prepare
    fed = make_federation(5, _config(FULL))
    directory = fed.server.collect_keys(fed.clients[n].advertise_keys() for n in fed.ids)
    relays = fed.server.collect_shares(fed.clients[n].share_keys(directory) for n in fed.ids)
    inputs = [fed.clients[n].mask_input(relays[n], fed.vectors[n], 1.0) for n in fed.ids]
    inputs[0] = MaskedInput(1, inputs[0].sender, inputs[0].masked.astype(np.int64))

    # Execute
    fed.server.collect_masked_inputs(inputs)

    # Assert
    assert [r.reason for r in fed.server.rejections] == ["MALFORMED"]
    assert "uint32" in fed.server.rejections[0].detail


def test_stages_must_come_in_order() -> None:
    fed = make_federation(3, _config(FULL))
    with pytest.raises(ProtocolError, match="WRONG_STAGE"):
        fed.server.collect_masked_inputs([])
