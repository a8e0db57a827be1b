"""One malicious client against SecAggClient/SecAggServer: the round completes without the
attacker's harm, or is abandoned with a reason; it never yields a wrong sum.

Regime: n = 7 or 8 (k and t from the default γ = 1/3, δ = 1/10), one honest client dropping out,
and the attacker sending exactly what a real client would except for the attack. Every
completed sum is compared with the plain weighted sum of the contributors' vectors,
computed here (``assert_matches_plain_sum``).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from fractions import Fraction

import numpy as np
import pytest

from fedlora.privacy.secagg import (
    FixedPointCodec,
    KeyAdvertisement,
    MaskedInput,
    SecAggAborted,
    SecAggConfig,
    ShareBundle,
    Stage,
    UnmaskResponse,
)
from fedlora.privacy.secagg.encoding import OutOfRange
from fedlora.privacy.secagg.keys import LOW_ORDER_U, check_public_key
from fedlora.privacy.secagg.params import CORRECTNESS_BITS, SECURITY_BITS, choose_parameters
from fedlora.privacy.secagg.shamir import PRIME, SHARE_BYTES

from .helpers import Federation, assert_matches_plain_sum, make_federation

CONFIG = SecAggConfig(clip_range=2.0, max_weight=100.0)
N = 7
P = 2**255 - 19


def _round(fed: Federation, *, advert=None, bundle=None, masked=None, response=None,
           drop_at: Stage | None = None, dropout: int | None = None,
           declared: bool = True):
    """A whole round; each hook may replace the attacker's message of its stage."""
    server, ids = fed.server, fed.ids
    keep = lambda stage, nodes: [n for n in nodes if not (stage == drop_at and n == dropout)]  # noqa: E731
    adverts = [fed.clients[n].advertise_keys() for n in keep(Stage.ADVERTISE_KEYS, ids)]
    adverts = [advert(a) if advert else a for a in adverts]
    directory = server.collect_keys(adverts)
    bundles = [fed.clients[n].share_keys(directory)
               for n in keep(Stage.SHARE_KEYS, directory.public_keys)]
    bundles = [bundle(b) if bundle else b for b in bundles]
    relays = server.collect_shares(bundles)
    inputs = [fed.clients[n].mask_input(relays[n], fed.vectors[n], fed.weights[n])
              for n in keep(Stage.MASKED_INPUT, relays)]
    inputs = [masked(m) if masked else m for m in inputs]
    requests = server.collect_masked_inputs(inputs)
    responses = [fed.clients[n].unmask(requests[n]) for n in keep(Stage.UNMASK, requests)]
    responses = [response(r) if response else r for r in responses]
    weights = {n: fed.weights[n] for n in requests} if declared else None
    return server.collect_unmask_responses(responses, declared_weights=weights)


def _reasons(fed: Federation) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for rejection in fed.server.rejections:
        out.setdefault(rejection.node, set()).add(rejection.reason)
    return out


# --------------------------------------------------------------------------- low-order keys


@pytest.mark.parametrize("u", sorted(LOW_ORDER_U) + [P, P + 1])
def test_every_low_order_point_is_refused(u: int) -> None:
    raw = u.to_bytes(32, "little")
    with pytest.raises(ValueError, match="small order"):
        check_public_key(raw)


@pytest.mark.parametrize("which", ["mask", "encryption"])
@pytest.mark.parametrize("u", [0, 1, P - 1])
def test_a_low_order_key_drops_only_its_sender(which: str, u: int) -> None:
    # Prepare: the attacker advertises a point of small order; another client drops at stage 2
    fed = make_federation(N, CONFIG, seed=1)
    attacker, dropout = fed.ids[2], fed.ids[5]

    def low_order(advert: KeyAdvertisement) -> KeyAdvertisement:
        if advert.sender != attacker:
            return advert
        keys = dataclasses.replace(advert.keys, **{which: u.to_bytes(32, "little")})
        return dataclasses.replace(advert, keys=keys)

    # Execute
    result = _round(fed, advert=low_order, drop_at=Stage.MASKED_INPUT, dropout=dropout)

    # Assert: the attacker is gone at stage 0, every honest client but the dropout is summed
    assert _reasons(fed)[attacker] == {"BAD_PUBLIC_KEY"}
    assert result.contributors == set(fed.ids) - {attacker, dropout}
    assert not any(fed.clients[n].failed for n in fed.ids if n != attacker)
    assert_matches_plain_sum(fed, result)


# --------------------------------------------------------------------------- forged shares


def _forge(attacker: int, receivers: int | None = None):
    """Replace the attacker's ciphertexts (all, or to the first ``receivers``) by random
    bytes of the right size."""
    def hook(bundle: ShareBundle) -> ShareBundle:
        if bundle.sender != attacker:
            return bundle
        targets = sorted(bundle.ciphertexts)[:receivers]
        forged = {r: (secrets.token_bytes(len(c)) if r in targets else c)
                  for r, c in bundle.ciphertexts.items()}
        return dataclasses.replace(bundle, ciphertexts=forged)
    return hook


def test_forged_share_ciphertexts_leave_out_the_forger_and_nobody_else() -> None:
    # Prepare: the attacker forges every ciphertext; an honest client drops at stage 3
    fed = make_federation(N, CONFIG, seed=2)
    attacker = fed.ids[1]
    dropout = next(n for n in fed.ids if n != attacker)

    # Execute
    result = _round(fed, bundle=_forge(attacker), drop_at=Stage.UNMASK, dropout=dropout)

    # Assert: every neighbour stayed, reported the forger, and the sum is the honest one
    neighbours = fed.server.graph[attacker]
    assert not any(fed.clients[n].failed for n in fed.ids)
    for node in neighbours:
        assert fed.clients[node].snapshot()["unreadable_ids"] == [attacker] or node == dropout
    assert "UNRECOVERABLE_SHARES" in _reasons(fed)[attacker]
    assert result.contributors == set(fed.ids) - {attacker}  # the dropout's input is in
    assert_matches_plain_sum(fed, result)


def test_shares_forged_to_one_neighbour_cost_nothing() -> None:
    # Prepare: one forged ciphertext; the attacker's other holders still reach t
    fed = make_federation(N, CONFIG, seed=3)
    attacker = fed.ids[4]

    # Execute
    result = _round(fed, bundle=_forge(attacker, receivers=1))

    # Assert: the self-mask of the attacker is rebuilt from the readable shares
    assert result.contributors == set(fed.ids)
    victim = min(fed.server.graph[attacker])
    assert fed.clients[victim].snapshot()["unreadable_ids"] == [attacker]
    assert_matches_plain_sum(fed, result)


# --------------------------------------------------------------------------- shifted share


def _shift(fed: Federation, attacker: int, victim: int):
    """The attacker moves its share of the victim's self-mask seed so that interpolating
    the t lowest holders' shares gives b_victim + 1 (still 32 bytes wide)."""
    def hook(response: UnmaskResponse) -> UnmaskResponse:
        if response.sender != attacker:
            return response
        t = fed.server.group.threshold
        holders = sorted(fed.server.graph[victim] | {victim})[:t]
        assert attacker in holders
        x = {h: h + 1 for h in holders}
        lam = 1
        for h in holders:
            if h != attacker:
                lam = lam * x[h] * pow(x[h] - x[attacker], -1, PRIME) % PRIME
        shares = dict(response.self_mask_shares)
        y = int.from_bytes(shares[victim], "big")
        shares[victim] = ((y + pow(lam, -1, PRIME)) % PRIME).to_bytes(SHARE_BYTES, "big")
        return dataclasses.replace(response, self_mask_shares=shares)
    return hook


def _victim_and_attacker(fed: Federation) -> tuple[int, int, int]:
    """A victim, an attacker among its t lowest holders, and a client holding no share of
    the victim (its dropout leaves the victim's surplus share in place)."""
    fed.server.collect_keys(fed.clients[n].advertise_keys() for n in fed.ids)
    t = fed.server.group.threshold
    for victim in fed.ids:
        holders = sorted(fed.server.graph[victim] | {victim})
        outsiders = [n for n in fed.ids if n not in holders]
        if outsiders and len(holders) > t:
            attacker = next(h for h in holders[:t] if h != victim)
            return victim, attacker, outsiders[0]
    raise AssertionError("no victim with a surplus share and an outsider")


def test_a_shifted_self_mask_share_is_caught_and_its_holder_named() -> None:
    # Prepare: find roles on this graph, then replay the round on a fresh server, same seed
    probe = make_federation(8, CONFIG, seed=4)  # k = 5, t = 4: two outsiders per client
    victim, attacker, dropout = _victim_and_attacker(probe)
    fed = make_federation(8, CONFIG, seed=4)
    fed.server.graph_seed = probe.server.graph_seed

    # Execute: an outsider drops at stage 3, the attacker shifts its share
    result = _round(fed, response=_shift(fed, attacker, victim), drop_at=Stage.UNMASK,
                    dropout=dropout)

    # Assert: the committed seed is found from other shares; the right holder is named
    assert [r.node for r in fed.server.rejections if r.reason == "BAD_SHARE"] == [attacker]
    assert result.contributors == set(fed.ids)
    assert abs(result.total_weight - sum(fed.weights.values())) < 1e-3
    assert_matches_plain_sum(fed, result)


def test_a_shifted_share_without_a_surplus_share_abandons_the_round() -> None:
    # Prepare: only t holders of the victim answer at stage 3, one of them shifted
    probe = make_federation(8, CONFIG, seed=4)  # k = 5, t = 4: two outsiders per client
    victim, attacker, _ = _victim_and_attacker(probe)
    fed = make_federation(8, CONFIG, seed=4)
    fed.server.graph_seed = probe.server.graph_seed
    t = probe.server.group.threshold
    holders = sorted(probe.server.graph[victim] | {victim})
    silent = set(holders[t:])

    # Execute / Assert
    with pytest.raises(SecAggAborted) as caught:
        _round_without(fed, silent, response=_shift(fed, attacker, victim))
    assert caught.value.reason == "CORRUPT_SHARES"
    assert f"client {victim}" in str(caught.value)


def _round_without(fed: Federation, silent: set[int], response) -> None:
    server, ids = fed.server, fed.ids
    directory = server.collect_keys(fed.clients[n].advertise_keys() for n in ids)
    relays = server.collect_shares(fed.clients[n].share_keys(directory) for n in ids)
    requests = server.collect_masked_inputs(
        fed.clients[n].mask_input(relays[n], fed.vectors[n], fed.weights[n]) for n in ids)
    server.collect_unmask_responses(
        [response(fed.clients[n].unmask(requests[n])) for n in requests if n not in silent],
        declared_weights=fed.weights)


# --------------------------------------------------------------------------- bad weight word


def _bump_weight(attacker: int, levels: int):
    def hook(message: MaskedInput) -> MaskedInput:
        if message.sender != attacker:
            return message
        words = message.masked.copy()
        words[-1] += np.uint32(levels)  # the normaliser word, mod 2^32
        return dataclasses.replace(message, masked=words)
    return hook


def test_a_bad_weight_word_abandons_the_round_with_weight_mismatch() -> None:
    # Prepare: the attacker adds 40 % of its weight's levels to its normaliser word
    fed = make_federation(N, CONFIG, seed=5)
    attacker = fed.ids[3]
    codec = FixedPointCodec(CONFIG.clip_range, CONFIG.max_weight, N)
    extra = int(0.4 * codec.levels)

    # Execute / Assert
    with pytest.raises(SecAggAborted) as caught:
        _round(fed, masked=_bump_weight(attacker, extra), drop_at=Stage.UNMASK,
               dropout=fed.ids[0])
    assert caught.value.reason == "WEIGHT_MISMATCH"


def test_a_weight_word_that_cancels_the_others_is_out_of_range_even_undeclared() -> None:
    # Prepare: the review's attack: total weight → one level, every coordinate pushed 2^30
    fed = make_federation(N, CONFIG, seed=6)
    attacker = fed.ids[0]
    codec = FixedPointCodec(CONFIG.clip_range, CONFIG.max_weight, N)
    honest = sum(round(fed.weights[n] / CONFIG.max_weight * codec.levels) for n in fed.ids)

    def hook(message: MaskedInput) -> MaskedInput:
        if message.sender != attacker:
            return message
        words = message.masked.copy()
        words[-1] -= np.uint32(honest - 1)
        words[:-1] += np.uint32(2**30)
        return dataclasses.replace(message, masked=words)

    # Execute / Assert: no declared weights to compare with; the range checks still hold
    with pytest.raises(SecAggAborted) as caught:
        _round(fed, masked=hook, declared=False)
    assert caught.value.reason == "OUT_OF_RANGE"


def test_a_small_weight_word_that_stays_in_range_is_caught_by_the_mean_bound() -> None:
    # Prepare: total weight → 1 % of the honest one, coordinates untouched (all in range)
    fed = make_federation(N, CONFIG, seed=7)
    attacker = fed.ids[0]
    codec = FixedPointCodec(CONFIG.clip_range, CONFIG.max_weight, N)
    honest = sum(round(fed.weights[n] / CONFIG.max_weight * codec.levels) for n in fed.ids)

    # Execute / Assert: |Σ w x| ≤ c Σ w fails, so no mean outside [−c, c] is released
    with pytest.raises(SecAggAborted) as caught:
        _round(fed, masked=_bump_weight(attacker, -int(0.99 * honest) % 2**32),
               declared=False)
    assert caught.value.reason == "OUT_OF_RANGE"


def test_the_codec_rejects_a_random_sum_but_not_an_extreme_honest_one() -> None:
    codec = FixedPointCodec(clip_range=1.0, max_weight=1.0, num_clients=5)
    extreme = sum(codec.encode(np.full(100, 1.0), 1.0) for _ in range(5)).astype(np.uint32)
    assert codec.decode(extreme, 5).total_weight == pytest.approx(5.0)
    garbage = np.random.default_rng(0).integers(0, 2**32, 101, dtype=np.uint64)
    with pytest.raises(OutOfRange, match="outside"):
        codec.decode(garbage.astype(np.uint32), 5)


# --------------------------------------------------------------------------- pairwise seeds


def test_pairwise_seeds_are_revealed_only_with_t_minus_one_survivors() -> None:
    fed = make_federation(N, CONFIG, seed=8)
    server = fed.server
    directory = server.collect_keys(fed.clients[n].advertise_keys() for n in fed.ids)
    relays = server.collect_shares(fed.clients[n].share_keys(directory) for n in fed.ids)
    for n in fed.ids:
        fed.clients[n].mask_input(relays[n], fed.vectors[n], fed.weights[n])
    node = fed.ids[0]
    peers = sorted(server.graph[node])
    t = server.group.threshold
    few = frozenset(peers[: t - 2]) | {node}  # t − 2 surviving peers: no seed may leave
    response = fed.clients[node].unmask(dataclasses.replace(
        server_request(node, peers, few), survivors=few,
        dropped=frozenset(peers) - few))
    assert response.pair_seeds == {}
    assert set(response.mask_key_shares) == set(peers) - few


def server_request(node: int, peers: list[int], survivors: frozenset[int]):
    from fedlora.privacy.secagg import UnmaskRequest
    return UnmaskRequest(1, node, survivors, frozenset(peers) - survivors)


# --------------------------------------------------------------------------- Bell et al. k, t


def _exact_exposure(n: int, c: int, k: int, t: int) -> Fraction:
    """(n − c) · P(X ≥ t), X ~ Hypergeometric(n − 1, c, k), in exact rationals."""
    tail = sum(Fraction(math.comb(c, x) * math.comb(n - 1 - c, k - x), math.comb(n - 1, k))
               for x in range(t, min(c, k) + 1))
    return (n - c) * tail


def test_n_60_with_a_third_colluding_is_below_the_exposure_target() -> None:
    n = 60
    group = SecAggConfig(gamma=1 / 3, delta=0.1).resolve(n)
    exposure = _exact_exposure(n, 20, group.neighbours, group.threshold)
    assert exposure < Fraction(1, 2**SECURITY_BITS)
    dropped = sum(Fraction(math.comb(6, y) * math.comb(53, group.neighbours - y),
                           math.comb(59, group.neighbours))
                  for y in range(group.neighbours - group.threshold + 1, 7))
    assert n * dropped < Fraction(1, 2**CORRECTNESS_BITS)
    assert 2 * group.threshold > group.neighbours + 1  # the double-reveal majority
    assert group.neighbours < n - 1  # and still sparser than full SecAgg
    # the old default, k = ⌈3 log2 n⌉ = 18 with a majority t = 10, exposes with ~0.6
    assert _exact_exposure(n, 20, 18, 10) > Fraction(1, 2)


@pytest.mark.parametrize("n", [6, 20, 100, 500])
def test_the_chosen_graph_meets_both_targets_and_is_the_smallest(n: int) -> None:
    choice = choose_parameters(n, 1 / 3, 0.1)
    assert choice.meets_targets
    assert float(_exact_exposure(n, choice.colluders, choice.neighbours,
                                 choice.threshold)) <= 2.0**-SECURITY_BITS
    smaller = [k for k in range(1, choice.neighbours) if not (k % 2 and n % 2)]
    for k in smaller:  # no smaller k has a majority t that is secure and tolerates δ n
        for t in range((k + 1) // 2 + 1, k + 2):
            secure = float(_exact_exposure(n, choice.colluders, k, t)) <= 2.0**-SECURITY_BITS
            lost = sum(math.comb(choice.dropouts, y) * math.comb(n - 1 - choice.dropouts, k - y)
                       for y in range(k - t + 1, min(choice.dropouts, k) + 1))
            correct = n * lost / math.comb(n - 1, k) <= 2.0**-CORRECTNESS_BITS
            assert not (secure and correct), (k, t)


def test_the_start_up_line_states_both_probabilities() -> None:
    line = SecAggConfig().assess(60).describe()
    assert "P(an honest client exposed)" in line and "P(round fails)" in line
    assert "20 colluding and 6 dropped" in line

