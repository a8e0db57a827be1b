"""What the server can recover, as pure functions: whose input and masks stage 3 can remove
(:func:`unrecoverable_inputs`, :func:`stranded_masks`), a secret rebuilt from shares that may
include forged ones (:func:`rebuild_secret`), and whether a decoded sum is one the
contributors' honest inputs can give (:func:`sum_problem`); the round's :class:`SecureSum`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedlora.privacy.secagg.encoding import DecodedSum
from fedlora.privacy.secagg.errors import ShamirError
from fedlora.privacy.secagg.keys import MASK_PURPOSE, PublicKeys, agree
from fedlora.privacy.secagg.messages import Stage
from fedlora.privacy.secagg.prg import apply_mask
from fedlora.privacy.secagg.replies import reveals_pair_seeds
from fedlora.privacy.secagg.shamir import combine_shares, evaluate_at

#: Most subsets of ``t`` shares tried to find one consistent with a commitment.
MAX_SUBSETS = 4096


@dataclass(frozen=True)
class SecureSum:
    """Result of a completed round.

    Parameters
    ----------
    server_round
        The round.
    weighted_sum
        ``Σ_{u ∈ U3} w_u · clip(x_u)``, float32, shape ``(d,)``.
    total_weight
        ``Σ_{u ∈ U3} w_u``.
    contributors
        ``U3``: clients whose input is in the sum.
    dropped
        Clients lost at each stage (``Stage → ids``). Those under
        ``Stage.UNMASK`` sent their input (it is in the sum) but not their shares.
    error_bound
        Largest fixed-point error of any ``weighted_sum`` coordinate.
    """

    server_round: int
    weighted_sum: np.ndarray
    total_weight: float
    contributors: frozenset[int]
    dropped: Mapping[Stage, frozenset[int]] = field(default_factory=dict)
    error_bound: float = 0.0

    def mean(self) -> np.ndarray:
        """Weighted mean ``Σ w_u x_u / Σ w_u``, float32, shape ``(d,)``."""
        return DecodedSum(self.weighted_sum, self.total_weight).mean()


def readable_holders(node: int, survivors: frozenset[int], peers: Mapping[int, frozenset[int]],
                     unreadable: Mapping[int, frozenset[int]]) -> frozenset[int]:
    """Survivors that hold readable shares of ``node``'s secrets (``node`` itself too).

    ``peers[u]``: the clients ``u`` masked with (its share holders besides itself);
    ``unreadable[v]``: the peers whose shares ``v`` could not read (its ``no_shares_of``).
    """
    holders = {v for v in peers[node] & survivors if node not in unreadable.get(v, ())}
    return frozenset(holders | ({node} & survivors))


def unrecoverable_inputs(survivors: frozenset[int], peers: Mapping[int, frozenset[int]],
                         unreadable: Mapping[int, frozenset[int]],
                         threshold: int) -> frozenset[int]:
    """The survivors whose self-mask seed fewer than ``threshold`` surviving holders can
    rebuild (:func:`readable_holders`): their input cannot be unmasked and is left out."""
    return frozenset(node for node in survivors
                     if len(readable_holders(node, survivors, peers, unreadable)) < threshold)


def stranded_masks(node: int, survivors: frozenset[int], peers: Mapping[int, frozenset[int]],
                   unreadable: Mapping[int, frozenset[int]],
                   early_seeds: Mapping[tuple[int, int], bytes],
                   revealed: Mapping[int, frozenset[int]], threshold: int) -> str | None:
    """Why stage 3 could not remove the pairwise masks of dropped client ``node``, or ``None``.

    They can be removed with its mask key when ``threshold`` surviving peers hold readable
    shares of it, or with pairwise seeds when every surviving peer sent one at stage 2
    (``early_seeds``, ``(sender, peer) -> seed``) or will at stage 3 (:func:`reveals_pair_seeds`
    with the seeds it ``revealed`` already). ``None`` too when ``node`` survived or no
    survivor masked with it.
    """
    mine = peers[node] & survivors
    if node in survivors or not mine:
        return None
    key_holders = readable_holders(node, survivors, peers, unreadable) - {node}
    revealers = {
        v for v in mine
        if (v, node) in early_seeds or reveals_pair_seeds(
            peers[v] & survivors | {v}, peers[v] - survivors, v, revealed[v], threshold)
    }
    if len(key_holders) >= threshold or revealers == mine:
        return None
    return (f"the masks of dropped client {node} can be removed neither with its mask "
            f"key ({len(key_holders)} surviving holder(s) of readable shares, threshold "
            f"{threshold}) nor with pairwise seeds (neighbours "
            f"{sorted(mine - revealers)} have too few surviving peers to reveal them)")


@dataclass(frozen=True)
class Rebuilt:
    """What :func:`rebuild_secret` found.

    ``secret`` is ``None`` when it could not be rebuilt: ``reason`` is then
    ``BELOW_THRESHOLD`` (fewer than ``t`` shares) or ``CORRUPT_SHARES`` (no ``t``-subset
    passed) and ``problem`` the message. ``off_polynomial`` lists, in holder order, the
    holders whose share lies off the polynomial of the secret that passed, and
    ``off_polynomial_detail`` says so for their rejection.
    """

    secret: bytes | None
    off_polynomial: tuple[int, ...] = ()
    off_polynomial_detail: str = ""
    reason: str = ""
    problem: str = ""


def rebuild_secret(shares: Mapping[int, bytes], threshold: int, size: int,
                   valid: Callable[[bytes], bool], *, what: str = "secret",
                   max_subsets: int = MAX_SUBSETS) -> Rebuilt:
    """The ``size``-byte secret (``what``, for the messages) of ``t = threshold`` of
    ``shares`` (holder -> share) that passes ``valid`` (e.g. matches its commitment).

    Tries the ``t`` lowest holders first, then other ``t``-subsets in lexicographic order (at
    most ``max_subsets``). Once one passes, every other share is checked against the
    polynomial it defines.
    """
    if len(shares) < threshold:
        return Rebuilt(None, reason="BELOW_THRESHOLD", problem=(
            f"only {len(shares)} share(s) of the {what} arrived, {threshold} are needed"))
    holders = sorted(shares)
    problems = []
    for tried, subset in enumerate(itertools.combinations(holders, threshold)):
        if tried == max_subsets:
            problems.append(f"gave up after {max_subsets} subsets")
            break
        chosen = {holder: shares[holder] for holder in subset}
        try:
            secret = combine_shares(chosen, threshold, size)
        except ShamirError as error:
            problems.append(str(error))
            continue
        if not valid(secret):
            continue
        off = tuple(holder for holder in holders
                    if holder not in chosen and evaluate_at(chosen, holder) != shares[holder])
        return Rebuilt(secret, off, off_polynomial_detail=(
            f"its share of the {what} is not on the polynomial that {threshold} other shares "
            "define and that the committed value verifies"))
    return Rebuilt(None, reason="CORRUPT_SHARES", problem=(
        f"no {threshold} of the {len(shares)} shares of the {what} rebuild the committed "
        f"value{': ' + problems[-1] if problems else ''}"))


def sum_problem(decoded: DecodedSum, clip_range: float, weight_slack: float,
                error_bound: float, declared_weight: float | None, num_contributors: int
                ) -> tuple[str, str, str] | None:
    """Why ``decoded`` is no sum that honest contributors give, as ``(reason, message, hint)``
    for :class:`~fedlora.privacy.secagg.SecAggAborted`; ``None`` when it is one.

    ``WEIGHT_MISMATCH``: the summed weight differs from ``declared_weight`` (the sum of the
    weights the ``num_contributors`` contributors declared) by more than ``weight_slack``
    (the codec's bound).
    ``OUT_OF_RANGE``: a non-finite sum, a weight that is not ``> 0``, or a coordinate beyond
    ``clip_range × (total weight + weight_slack) + error_bound`` (the mean would leave
    ``[−c, c]``).
    """
    if declared_weight is not None:
        expected = declared_weight
        if abs(decoded.total_weight - expected) > weight_slack + 1e-9 * expected:
            return ("WEIGHT_MISMATCH",
                    f"the securely summed weight is {decoded.total_weight:.6g}, but the "
                    f"{num_contributors} contributors declared {expected:.6g} in total "
                    f"(codec bound {weight_slack:.3g}); a client encoded a weight other than "
                    "the one it declared",
                    "a client sent a bad weight word; no mean is adopted")
    weighted = decoded.weighted_sum.astype(np.float64)
    limit = clip_range * (decoded.total_weight + weight_slack) + error_bound
    limit += 2.0**-23 * limit  # float32 rounding of the decoded sum
    if not np.all(np.isfinite(weighted)) or not decoded.total_weight > 0:
        return ("OUT_OF_RANGE", f"the decoded sum is not finite or its weight "
                f"{decoded.total_weight} is not > 0",
                "no mean exists; a client sent a bad masked input")
    if (worst := float(np.max(np.abs(weighted), initial=0.0))) > limit:
        return ("OUT_OF_RANGE",
                f"a coordinate of the weighted sum is {worst:.6g}, more than clip-range × "
                f"total weight = {limit:.6g} allows: the mean would leave [−c, c]",
                "a client sent a bad masked input or weight word; no mean is adopted")
    return None


def remove_pair_masks(total: np.ndarray, node: int, masked_with: frozenset[int],
                      private_key: X25519PrivateKey | None, keys: Mapping[int, PublicKeys],
                      seeds: Mapping[int, bytes], server_round: int) -> None:
    """Undo, in ``total`` (uint32, ``(d + 1,)``), the pairwise masks ``σ(v, u)·PRG(s_{u,v})``
    of dropped client ``u = node`` with each ``v`` in ``masked_with``.

    ``s_{u,v}`` is agreed from ``u``'s rebuilt ``private_key`` and ``v``'s advertised mask key
    (``keys[v]``) when the key is given, else taken from ``seeds[v]`` (revealed by ``v``).
    """
    for peer in sorted(masked_with):
        if private_key is not None:
            seed = agree(private_key, keys[peer].mask, purpose=MASK_PURPOSE,
                         server_round=server_round, self_id=node, peer_id=peer)
        else:
            seed = seeds[peer]
        apply_mask(total, seed, -1 if peer < node else 1)  # undo σ(peer, node)
