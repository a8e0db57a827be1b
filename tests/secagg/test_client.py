"""Client-side guards: order, round, receiver, key integrity, shares, the double-reveal attack."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedlora.privacy.secagg import (
    KeyDirectory,
    ProtocolError,
    PublicKeys,
    RelayedShares,
    SecAggAborted,
    SecAggClient,
    SecAggConfig,
    Stage,
    UnmaskRequest,
)

from .helpers import Federation, make_federation

CONFIG = SecAggConfig(clip_range=2.0, max_weight=100.0)


def _to_stage_two(fed: Federation) -> dict[int, RelayedShares]:
    directory = fed.server.collect_keys(fed.clients[n].advertise_keys() for n in fed.ids)
    return fed.server.collect_shares(fed.clients[n].share_keys(directory) for n in fed.ids)


def _to_stage_three(fed: Federation) -> dict[int, UnmaskRequest]:
    relays = _to_stage_two(fed)
    return fed.server.collect_masked_inputs(
        fed.clients[n].mask_input(relays[n], fed.vectors[n], 1.0) for n in fed.ids
    )


def test_double_reveal_request_is_refused() -> None:
    # Prepare: ask one client for both the self-mask and mask-key share of a peer
    fed = make_federation(5, CONFIG)
    requests = _to_stage_three(fed)
    node = fed.ids[0]
    honest = requests[node]
    peer = min(honest.survivors - {node})
    attack = dataclasses.replace(honest, dropped=honest.dropped | {peer})

    # Execute / Assert
    with pytest.raises(ProtocolError, match="DOUBLE_REVEAL") as caught:
        fed.clients[node].unmask(attack)
    assert caught.value.reason == "DOUBLE_REVEAL"
    assert fed.clients[node].failed
    with pytest.raises(ProtocolError, match="ABORTED"):  # fail closed: no second chance
        fed.clients[node].unmask(honest)


def test_second_unmask_request_is_refused() -> None:
    # Prepare: after revealing self-mask shares, a request calling the peers dropped
    fed = make_federation(5, CONFIG)
    requests = _to_stage_three(fed)
    node = fed.ids[0]
    fed.clients[node].unmask(requests[node])
    flipped = UnmaskRequest(
        requests[node].server_round,
        node,
        survivors=frozenset({node}),
        dropped=requests[node].survivors - {node},
    )

    # Execute / Assert
    with pytest.raises(ProtocolError, match="WRONG_STAGE"):
        fed.clients[node].unmask(flipped)
    assert fed.clients[node].stage is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("self_dropped", "NOT_A_SURVIVOR"),
        ("unknown_peer", "REQUEST_MISMATCH"),
        ("missing_peer", "REQUEST_MISMATCH"),
    ],
)
def test_unmask_request_must_match_the_share_group(change: str, reason: str) -> None:
    # Prepare
    fed = make_federation(5, CONFIG)
    requests = _to_stage_three(fed)
    node = fed.ids[0]
    request = requests[node]
    survivors, dropped = set(request.survivors), set(request.dropped)
    if change == "self_dropped":
        survivors.discard(node)
        dropped.add(node)
    elif change == "unknown_peer":
        dropped.add(12345)
    else:
        survivors.discard(max(survivors - {node}))

    # Execute / Assert
    with pytest.raises(ProtocolError, match=reason):
        fed.clients[node].unmask(
            UnmaskRequest(request.server_round, node, frozenset(survivors), frozenset(dropped))
        )


def test_unmask_reveals_only_what_the_request_names() -> None:
    # Prepare: one peer dropped after sharing
    fed = make_federation(5, CONFIG)
    relays = _to_stage_two(fed)
    node, gone = fed.ids[0], fed.ids[1]
    requests = fed.server.collect_masked_inputs(
        fed.clients[n].mask_input(relays[n], fed.vectors[n], 1.0) for n in fed.ids if n != gone
    )

    # Execute
    response = fed.clients[node].unmask(requests[node])

    # Assert
    assert set(response.mask_key_shares) == {gone}
    assert set(response.self_mask_shares) == set(fed.ids) - {gone}
    assert not set(response.self_mask_shares) & set(response.mask_key_shares)


def test_messages_for_another_round_are_refused_without_failing() -> None:
    # Prepare
    fed = make_federation(3, CONFIG, server_round=4)
    directory = fed.server.collect_keys(fed.clients[n].advertise_keys() for n in fed.ids)
    node = fed.ids[0]

    # Execute / Assert
    with pytest.raises(ProtocolError, match="WRONG_ROUND"):
        fed.clients[node].share_keys(dataclasses.replace(directory, server_round=3))
    assert not fed.clients[node].failed
    fed.clients[node].share_keys(directory)


def test_stages_must_come_in_order() -> None:
    client = SecAggClient(1, CONFIG, 1)
    with pytest.raises(ProtocolError, match="WRONG_STAGE"):
        client.unmask(UnmaskRequest(1, 1, frozenset({1}), frozenset()))
    client.advertise_keys()
    with pytest.raises(ProtocolError, match="WRONG_STAGE"):
        client.advertise_keys()


def test_message_for_another_receiver_is_refused() -> None:
    fed = make_federation(3, CONFIG)
    relays = _to_stage_two(fed)
    a, b = fed.ids[0], fed.ids[1]
    with pytest.raises(ProtocolError, match="WRONG_RECEIVER"):
        fed.clients[a].mask_input(relays[b], fed.vectors[a], 1.0)


def test_directory_that_alters_the_clients_keys_is_refused() -> None:
    # Prepare: the server swaps in its own mask key for client 0
    fed = make_federation(3, CONFIG)
    directory = fed.server.collect_keys(fed.clients[n].advertise_keys() for n in fed.ids)
    node = fed.ids[0]
    keys = dict(directory.public_keys)
    keys[node] = PublicKeys(mask=keys[fed.ids[1]].mask, encryption=keys[node].encryption)

    # Execute / Assert
    with pytest.raises(ProtocolError, match="KEY_MISMATCH"):
        fed.clients[node].share_keys(dataclasses.replace(directory, public_keys=keys))
    assert fed.clients[node].failed


def test_too_small_directory_aborts_the_client() -> None:
    config = SecAggConfig(threshold=3, neighbours=4)
    client = SecAggClient(1, config, 1)
    advert = client.advertise_keys()
    other = SecAggClient(2, config, 1).advertise_keys()
    directory = KeyDirectory(1, bytes(32), 8, {1: advert.keys, 2: other.keys})
    with pytest.raises(SecAggAborted, match="share-keys"):
        client.share_keys(directory)


def test_a_tampered_relayed_share_is_reported_not_fatal() -> None:
    # Prepare: the server (or a forging peer) flips one bit of a ciphertext it relays
    fed = make_federation(4, CONFIG)
    relays = _to_stage_two(fed)
    node = fed.ids[0]
    sender, ciphertext = next(iter(relays[node].ciphertexts.items()))
    tampered = dict(relays[node].ciphertexts)
    tampered[sender] = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])

    # Execute
    masked = fed.clients[node].mask_input(
        dataclasses.replace(relays[node], ciphertexts=tampered), fed.vectors[node], 1.0
    )

    # Assert: still in the round, masked with every sender, holding nothing of the forger
    assert not fed.clients[node].failed
    assert masked.no_shares_of == {sender}
    assert sender not in fed.clients[node].snapshot()["held_ids"]
    assert fed.clients[node].snapshot()["peer_ids"] == sorted(relays[node].ciphertexts)


def test_a_ciphertext_relayed_to_the_wrong_client_does_not_authenticate() -> None:
    # Prepare: u receives the shares v encrypted for w (AD binds the receiver)
    fed = make_federation(4, CONFIG)
    relays = _to_stage_two(fed)
    u, w = fed.ids[0], fed.ids[1]
    v = next(peer for peer in relays[u].ciphertexts if peer in relays[w].ciphertexts)
    swapped = dict(relays[u].ciphertexts)
    swapped[v] = relays[w].ciphertexts[v]

    # Execute
    masked = fed.clients[u].mask_input(
        dataclasses.replace(relays[u], ciphertexts=swapped), fed.vectors[u], 1.0
    )

    # Assert
    assert masked.no_shares_of == {v}


def test_shares_from_a_non_neighbour_are_refused() -> None:
    # Prepare: sparse graph; add a ciphertext from a client outside the neighbourhood
    fed = make_federation(9, SecAggConfig(neighbours=2, clip_range=2.0, max_weight=100.0))
    relays = _to_stage_two(fed)
    node = fed.ids[0]
    stranger = next(n for n in fed.ids if n != node and n not in fed.server.graph[node])
    forged = {**relays[node].ciphertexts, stranger: bytes(160)}

    # Execute / Assert
    with pytest.raises(ProtocolError, match="NOT_A_NEIGHBOUR"):
        fed.clients[node].mask_input(
            dataclasses.replace(relays[node], ciphertexts=forged), fed.vectors[node], 1.0
        )


def test_wrong_vector_size_is_refused() -> None:
    fed = make_federation(3, CONFIG, vector_size=8)
    relays = _to_stage_two(fed)
    node = fed.ids[0]
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        fed.clients[node].mask_input(relays[node], np.zeros(9, np.float32), 1.0)


def test_client_forgets_its_secrets_after_masking_and_its_mask_key_after_unmasking() -> None:
    fed = make_federation(3, CONFIG)
    relays = _to_stage_two(fed)
    node = fed.ids[0]
    fed.clients[node].mask_input(relays[node], fed.vectors[node], 1.0)
    snapshot = fed.clients[node].snapshot()
    assert snapshot["encryption_key"] == snapshot["self_seed"] == b""
    assert fed.clients[node].stage == Stage.UNMASK
    fed.clients[node].unmask(UnmaskRequest(1, node, frozenset(fed.ids), frozenset()))
    snapshot = fed.clients[node].snapshot()
    assert snapshot["mask_key"] == snapshot["encryption_key"] == snapshot["self_seed"] == b""
    assert snapshot["held_ids"] == []


def test_snapshot_holds_only_plain_values_and_round_trips() -> None:
    # Prepare
    fed = make_federation(4, CONFIG)
    _to_stage_two(fed)
    node = fed.ids[0]
    snapshot = fed.clients[node].snapshot()

    # Execute
    restored = SecAggClient.restore(CONFIG, snapshot)

    # Assert
    plain = (int, bytes)
    for key, value in snapshot.items():
        values = value if isinstance(value, list) else [value]
        assert all(isinstance(v, plain) and not isinstance(v, bool) for v in values), key
    assert restored.snapshot() == snapshot
    assert restored.stage == Stage.MASKED_INPUT


@pytest.mark.parametrize(
    ("key", "value"),
    [("stage", 9), ("mask_key", "text"), ("held_ids", [1, 2, 3]), ("node_id", None)],
)
def test_corrupt_snapshot_is_refused(key: str, value: object) -> None:
    client = SecAggClient(1, CONFIG, 1)
    client.advertise_keys()
    snapshot = {**client.snapshot(), key: value}
    with pytest.raises(ProtocolError, match="BAD_SNAPSHOT"):
        SecAggClient.restore(CONFIG, snapshot)


def test_missing_snapshot_field_is_refused() -> None:
    snapshot = SecAggClient(1, CONFIG, 1).snapshot()
    del snapshot["peer_ids"]
    with pytest.raises(ProtocolError, match="peer_ids"):
        SecAggClient.restore(CONFIG, snapshot)
