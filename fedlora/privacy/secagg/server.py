"""Server side of a secure-aggregation round: relay, track dropouts, unmask the sum.

One :class:`SecAggServer` per round. Each ``collect_*`` method takes the
replies of one stage (in any order; missing clients simply are not there) and
returns what to send next::

    server = SecAggServer(config, server_round, participants, vector_size)
    directory = server.collect_keys(adverts)               # broadcast to everyone
    relays = server.collect_shares(bundles)                # relays[u] goes to client u
    requests = server.collect_masked_inputs(inputs)        # requests[u] goes to client u
    result = server.collect_unmask_responses(responses)    # SecureSum

Let ``U1 ⊇ U2 ⊇ U3 ⊇ U4`` be the clients with a valid reply at stages 0–3 and
``P(u) = N(u) ∩ U2`` the peers ``u`` masked with. The unmasked ring sum is::

    z = Σ_{u ∈ U3} y_u − Σ_{u ∈ U3} PRG(b_u)
        − Σ_{u ∈ U2∖U3} Σ_{v ∈ P(u) ∩ U3} σ(v, u) · PRG(s_{u,v})      (mod 2^32)

where ``b_u`` is rebuilt from ``t`` self-mask shares held by ``P(u) ∪ {u}``
in ``U4`` and ``s_u^SK`` (hence ``s_{u,v}``) from ``t`` mask-key shares held by
``P(u) ∩ U4``. Pairwise masks between two survivors cancel without help.

A reply is rejected — its sender counts as dropped at that stage, the reason
goes to :attr:`SecAggServer.rejections` — when it is for another round, from a
client not expected at this stage, sent twice, or malformed. After stage 1,
clients whose share group fell below ``t`` are pruned (nobody masks with
them). Whenever a secret could no longer be reconstructed, or fewer than ``t``
clients remain, the round raises :class:`SecAggAborted` and yields no sum.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

import numpy as np

from fedlora.errors import ConfigError
from fedlora.privacy.secagg.channel import NONCE_BYTES, TAG_BYTES
from fedlora.privacy.secagg.client import reveals_pair_seeds
from fedlora.privacy.secagg.config import GroupParameters, SecAggConfig
from fedlora.privacy.secagg.encoding import DecodedSum, FixedPointCodec, OutOfRange
from fedlora.privacy.secagg.errors import ProtocolError, SecAggAborted, ShamirError
from fedlora.privacy.secagg.graph import neighbour_graph
from fedlora.privacy.secagg.ids import check_node_id, check_round
from fedlora.privacy.secagg.keys import (
    KEY_BYTES,
    MASK_PURPOSE,
    PublicKeys,
    agree,
    check_public_key,
    commit,
    load_private_key,
    public_bytes,
)
from fedlora.privacy.secagg.messages import (
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    RelayedShares,
    ShareBundle,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from fedlora.privacy.secagg.prg import SEED_BYTES, apply_mask
from fedlora.privacy.secagg.shamir import SHARE_BYTES, combine_shares, evaluate_at

M = TypeVar("M")
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
GRAPH_SEED_BYTES = 32
COMMITMENT_BYTES = 32
#: Most subsets of ``t`` shares tried to find one consistent with a commitment.
MAX_SUBSETS = 4096


@dataclass(frozen=True)
class Rejection:
    """A reply the server discarded.

    ``reason`` is one of ``WRONG_ROUND``, ``UNEXPECTED_SENDER``, ``DUPLICATE``,
    ``DUPLICATE_KEY``, ``MALFORMED``, ``BAD_PUBLIC_KEY`` (a point of small order),
    ``TOO_FEW_NEIGHBOURS`` (pruned after stage 1 because its share group fell below
    the threshold), ``UNRECOVERABLE_SHARES`` (input left out at stage 2: too few holders
    could read its shares) or ``BAD_SHARE`` (a stage-3 share off the verified polynomial;
    the holder's own input stays in the sum, which no longer depends on the share).
    """

    stage: Stage
    node: Any
    reason: str
    detail: str


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


class SecAggServer:
    """The server's state for one round.

    Parameters
    ----------
    config
        Settings shared with the clients.
    server_round
        The round; replies for other rounds are rejected.
    participants
        Node ids asked to take part (distinct, in ``[0, 2^64)``).
    vector_size
        Float coordinates per client (``d``).
    graph_seed
        Public seed of the neighbour graph; 32 fresh random bytes by default.
    """

    def __init__(
        self,
        config: SecAggConfig,
        server_round: int,
        participants: Iterable[int],
        vector_size: int,
        *,
        graph_seed: bytes | None = None,
    ) -> None:
        self.config = config
        self.server_round = check_round(server_round)
        ids = [check_node_id(node, "participant id") for node in participants]
        if len(set(ids)) != len(ids):
            repeated = sorted({node for node in ids if ids.count(node) > 1})
            raise ValueError(f"participant ids must be distinct, got duplicates {repeated}")
        if isinstance(vector_size, bool) or not isinstance(vector_size, int) or vector_size < 1:
            raise ValueError(f"vector_size must be an int ≥ 1, got {vector_size!r}")
        self.participants = frozenset(ids)
        self.vector_size = vector_size
        self.graph_seed = (
            secrets.token_bytes(GRAPH_SEED_BYTES) if graph_seed is None else graph_seed
        )
        if not isinstance(self.graph_seed, bytes) or len(self.graph_seed) < 16:
            raise ValueError("graph_seed must be at least 16 random bytes")
        self._next: Stage | None = Stage.ADVERTISE_KEYS
        self._aborted = False
        self._active = self.participants
        self._dropped: dict[Stage, frozenset[int]] = {}
        self._rejections: list[Rejection] = []
        self._keys: dict[int, PublicKeys] = {}
        self._group: GroupParameters | None = None
        self._graph: dict[int, frozenset[int]] = {}
        self._peers: dict[int, frozenset[int]] = {}
        self._requests: dict[int, UnmaskRequest] = {}
        self._commitments: dict[int, bytes] = {}
        self._unreadable: dict[int, frozenset[int]] = {}
        self._revealed: dict[int, frozenset[int]] = {}  # seeds sent with the masked input
        self._early_seeds: dict[tuple[int, int], bytes] = {}  # (sender, peer) → s_{u,p}
        self._masked_total = np.zeros(0, dtype=np.uint32)

    # -- read-only views ---------------------------------------------------------------------

    @property
    def stage(self) -> Stage | None:
        """Stage whose replies are expected next; ``None`` once finished or aborted."""
        return self._next

    @property
    def aborted(self) -> bool:
        """Whether the round stopped without a sum."""
        return self._aborted

    @property
    def active(self) -> frozenset[int]:
        """Clients still in the round."""
        return self._active

    @property
    def dropped(self) -> Mapping[Stage, frozenset[int]]:
        """Clients lost at each completed stage."""
        return MappingProxyType(dict(self._dropped))

    @property
    def rejections(self) -> tuple[Rejection, ...]:
        """Every discarded reply, in arrival order."""
        return tuple(self._rejections)

    @property
    def group(self) -> GroupParameters | None:
        """``n``, ``k`` and ``t`` once keys are collected."""
        return self._group

    @property
    def graph(self) -> Mapping[int, frozenset[int]]:
        """The neighbour graph over the key advertisers."""
        return MappingProxyType(self._graph)

    # -- stages ------------------------------------------------------------------------------

    def collect_keys(self, adverts: Iterable[KeyAdvertisement]) -> KeyDirectory:
        """Stage 0: accept public keys, fix ``n``, ``k``, ``t`` and the neighbour graph."""
        stage = self._begin(Stage.ADVERTISE_KEYS)
        accepted = self._intake(stage, adverts, KeyAdvertisement, self._check_advert)
        accepted = self._drop_repeated_keys(stage, accepted)
        self._advance(stage, frozenset(accepted))
        try:
            group = self.config.resolve(len(accepted))
        except ConfigError:
            self._abort_quietly()
            raise
        except ValueError as error:
            self._abort(
                stage,
                f"{len(accepted)} of {len(self.participants)} clients advertised valid keys: "
                f"{error}",
            )
        self._group = group
        self._keys = {node: accepted[node].keys for node in sorted(accepted)}
        self._graph = neighbour_graph(self._keys, group.neighbours, self.graph_seed)
        return KeyDirectory(
            server_round=self.server_round,
            graph_seed=self.graph_seed,
            vector_size=self.vector_size,
            public_keys=MappingProxyType(dict(self._keys)),
        )

    def collect_shares(self, bundles: Iterable[ShareBundle]) -> dict[int, RelayedShares]:
        """Stage 1: accept encrypted shares, prune thin neighbourhoods, route ciphertexts."""
        stage = self._begin(Stage.SHARE_KEYS)
        accepted = self._intake(stage, bundles, ShareBundle, self._check_bundle)
        survivors = self._prune(stage, frozenset(accepted))
        self._advance(stage, survivors)
        self._require_threshold(stage, survivors)
        self._peers = {node: self._graph[node] & survivors for node in survivors}
        self._commitments = {node: accepted[node].commitment for node in survivors}
        return {
            node: RelayedShares(
                server_round=self.server_round,
                receiver=node,
                ciphertexts={peer: accepted[peer].ciphertexts[node] for peer in sorted(peers)},
            )
            for node, peers in sorted(self._peers.items())
        }

    def collect_masked_inputs(self, inputs: Iterable[MaskedInput]) -> dict[int, UnmaskRequest]:
        """Stage 2: sum the masked inputs and tell each survivor which peers dropped.

        A client ``p`` that some survivors hold no readable shares of (``no_shares_of``) is
        *excluded* — its input is left out of the sum and it counts as dropped (rejection
        ``UNRECOVERABLE_SHARES``; ``TOO_FEW_NEIGHBOURS`` when only dropouts caused it) —
        when fewer than ``t`` of its surviving holders (itself included) could read its
        shares: its self-mask could not be removed. Its pairwise
        masks are then removed with its rebuilt mask key or with the pairwise seeds its
        neighbours reveal.
        """
        stage = self._begin(Stage.MASKED_INPUT)
        accepted = self._intake(stage, inputs, MaskedInput, self._check_masked)
        threshold = self._require_group().threshold
        self._unreadable = {node: accepted[node].no_shares_of for node in accepted}
        self._revealed = {node: frozenset(accepted[node].pair_seeds) for node in accepted}
        self._early_seeds = {(node, peer): seed for node in accepted
                             for peer, seed in accepted[node].pair_seeds.items()}
        survivors = frozenset(accepted)
        while excluded := {
            node for node in survivors if len(self._readable_holders(node, survivors)) < threshold
        }:
            for node in sorted(excluded):
                accusers = sorted(v for v in survivors if node in self._unreadable.get(v, ()))
                self._reject(
                    stage,
                    node,
                    "UNRECOVERABLE_SHARES" if accusers else "TOO_FEW_NEIGHBOURS",
                    f"its input is left out: fewer than {threshold} surviving holders can "
                    f"rebuild its self-mask seed ({len(accusers)} neighbour(s) {accusers} "
                    "could not read its shares)",
                )
            survivors -= excluded
        self._advance(stage, survivors)
        self._require_threshold(stage, survivors)
        for node, peers in sorted(self._peers.items()):
            if node in survivors or not peers & survivors:
                continue
            key_holders = self._readable_holders(node, survivors) - {node}
            revealers = {
                v for v in peers & survivors
                if (v, node) in self._early_seeds or reveals_pair_seeds(
                    self._peers[v] & survivors | {v}, self._peers[v] - survivors, v,
                    self._revealed[v], threshold)
            }
            if len(key_holders) < threshold and revealers != peers & survivors:
                self._abort(
                    stage,
                    f"the masks of dropped client {node} can be removed neither with its mask "
                    f"key ({len(key_holders)} surviving holder(s) of readable shares, threshold "
                    f"{threshold}) nor with pairwise seeds (neighbours "
                    f"{sorted(peers & survivors - revealers)} have too few surviving peers to "
                    "reveal them)",
                )
        total = np.zeros(self.vector_size + 1, dtype=np.uint32)  # (d + 1,)
        for node in sorted(survivors):
            total += accepted[node].masked
        self._masked_total = total
        self._requests = {
            node: UnmaskRequest(
                server_round=self.server_round,
                receiver=node,
                survivors=frozenset(self._peers[node] & survivors | {node}),
                dropped=frozenset(self._peers[node] - survivors),
            )
            for node in sorted(survivors)
        }
        return dict(self._requests)

    def collect_unmask_responses(
        self,
        responses: Iterable[UnmaskResponse],
        declared_weights: Mapping[int, float] | None = None,
    ) -> SecureSum:
        """Stage 3: rebuild the needed secrets, remove the remaining masks, decode the sum.

        Every rebuilt self-mask seed is checked against its owner's stage-1 commitment and
        every rebuilt mask key against its advertised public key. When the ``t`` shares of
        the lowest holders do not pass, other subsets of the surplus shares are tried; the
        holders whose shares lie off the verified polynomial are named (rejection
        ``BAD_SHARE``). The decoded sum must be possible for the contributors (codec
        headroom), ``|Σ w x_i| ≤ c·Σ w`` must hold coordinate-wise, and, given
        ``declared_weights`` (``node → w``, e.g. the example counts the clients reported),
        the summed normaliser must equal their sum within the codec's bound.

        Raises
        ------
        SecAggAborted
            ``BELOW_THRESHOLD``, ``CORRUPT_SHARES`` (no consistent subset), ``OUT_OF_RANGE``
            (a sum or mean no honest inputs give) or ``WEIGHT_MISMATCH``.
        """
        stage = self._begin(Stage.UNMASK)
        contributors = frozenset(self._requests)
        accepted = self._intake(stage, responses, UnmaskResponse, self._check_unmask)
        responders = frozenset(accepted)
        self._advance(stage, responders)
        self._require_threshold(stage, responders)
        group = self._require_group()
        total, self._masked_total = self._masked_total, np.zeros(0, dtype=np.uint32)
        for node in sorted(contributors):
            holders = (self._peers[node] | {node}) & responders
            shares = {
                holder: accepted[holder].self_mask_shares[node]
                for holder in holders
                if node in accepted[holder].self_mask_shares
            }
            commitment = self._commitments[node]
            keys = self._keys[node]

            def matches(seed: bytes, node: int = node, commitment: bytes = commitment,
                        keys: PublicKeys = keys) -> bool:
                return commit(seed, keys, server_round=self.server_round,
                              node_id=node) == commitment

            seed = self._rebuild(stage, node, "self-mask seed", shares, SEED_BYTES, matches)
            apply_mask(total, seed, -1)
        for node in sorted(set(self._peers) - contributors):
            masked_with = self._peers[node] & contributors
            if not masked_with:
                continue
            holders = self._peers[node] & responders
            shares = {
                holder: accepted[holder].mask_key_shares[node]
                for holder in holders
                if node in accepted[holder].mask_key_shares
            }
            seeds = {
                peer: accepted[peer].pair_seeds[node]
                for peer in masked_with & responders
                if node in accepted[peer].pair_seeds
            }
            seeds.update({peer: self._early_seeds[peer, node] for peer in masked_with
                          if (peer, node) in self._early_seeds})
            advertised = self._keys[node].mask
            private = None
            if len(shares) >= group.threshold and set(seeds) != masked_with:
                raw = self._rebuild(
                    stage, node, "mask key", shares, KEY_BYTES,
                    lambda raw, advertised=advertised: public_bytes(load_private_key(raw))
                    == advertised,
                )
                private = load_private_key(raw)
            elif set(seeds) != masked_with:
                self._abort(
                    stage,
                    f"the masks of dropped client {node} cannot be removed: {len(shares)} "
                    f"share(s) of its mask key arrived ({group.threshold} needed) and "
                    f"{sorted(masked_with - set(seeds))} sent no pairwise seed",
                )
            for peer in sorted(masked_with):
                if private is not None:
                    seed = agree(
                        private,
                        self._keys[peer].mask,
                        purpose=MASK_PURPOSE,
                        server_round=self.server_round,
                        self_id=node,
                        peer_id=peer,
                    )
                else:
                    seed = seeds[peer]
                apply_mask(total, seed, -1 if peer < node else 1)  # undo σ(peer, node)
        codec = FixedPointCodec(self.config.clip_range, self.config.max_weight, group.num_clients)
        try:
            decoded = codec.decode(total, len(contributors))
        except OutOfRange as error:
            self._abort(stage, str(error), reason="OUT_OF_RANGE",
                        hint="a client sent a bad masked input or share; see the rejections")
        error_bound = codec.error_bound(len(contributors))
        self._check_sum(stage, decoded, codec, contributors, error_bound, declared_weights)
        return SecureSum(
            server_round=self.server_round,
            weighted_sum=decoded.weighted_sum,
            total_weight=decoded.total_weight,
            contributors=contributors,
            dropped=MappingProxyType(dict(self._dropped)),
            error_bound=error_bound,
        )

    def _check_sum(
        self,
        stage: Stage,
        decoded: DecodedSum,
        codec: FixedPointCodec,
        contributors: frozenset[int],
        error_bound: float,
        declared_weights: Mapping[int, float] | None,
    ) -> None:
        """Abort unless the decoded sum is one that the contributors' honest inputs give."""
        weight_slack = codec.weight_error_bound(len(contributors))
        if declared_weights is not None:
            expected = float(sum(declared_weights[node] for node in contributors))
            if abs(decoded.total_weight - expected) > weight_slack + 1e-9 * expected:
                self._abort(
                    stage,
                    f"the securely summed weight is {decoded.total_weight:.6g}, but the "
                    f"{len(contributors)} contributors declared {expected:.6g} in total "
                    f"(codec bound {weight_slack:.3g}); a client encoded a weight other than "
                    "the one it declared",
                    reason="WEIGHT_MISMATCH",
                    hint="a client sent a bad weight word; no mean is adopted",
                )
        weighted = decoded.weighted_sum.astype(np.float64)
        limit = self.config.clip_range * (decoded.total_weight + weight_slack) + error_bound
        limit += 2.0**-23 * limit  # float32 rounding of the decoded sum
        if not np.all(np.isfinite(weighted)) or not decoded.total_weight > 0:
            self._abort(stage, f"the decoded sum is not finite or its weight "
                        f"{decoded.total_weight} is not > 0", reason="OUT_OF_RANGE",
                        hint="no mean exists; a client sent a bad masked input")
        if (worst := float(np.max(np.abs(weighted), initial=0.0))) > limit:
            self._abort(
                stage,
                f"a coordinate of the weighted sum is {worst:.6g}, more than clip-range × "
                f"total weight = {limit:.6g} allows: the mean would leave [−c, c]",
                reason="OUT_OF_RANGE",
                hint="a client sent a bad masked input or weight word; no mean is adopted",
            )

    def _readable_holders(self, node: int, survivors: frozenset[int]) -> frozenset[int]:
        """Survivors that hold readable shares of ``node``'s secrets (``node`` itself too)."""
        holders = {v for v in self._peers[node] & survivors
                   if node not in self._unreadable.get(v, ())}
        return frozenset(holders | ({node} & survivors))

    def _rebuild(
        self,
        stage: Stage,
        node: int,
        what: str,
        shares: Mapping[int, bytes],
        size: int,
        valid: Callable[[bytes], bool],
    ) -> bytes:
        """The secret of ``node`` from ``t`` of ``shares`` that passes ``valid``.

        Tries the ``t`` lowest holders first, then other ``t``-subsets (at most
        :data:`MAX_SUBSETS`). Once one passes, every other share is checked against the
        polynomial it defines and its holder rejected as ``BAD_SHARE`` if it lies off it.
        """
        threshold = self._require_group().threshold
        if len(shares) < threshold:
            self._abort(
                stage,
                f"only {len(shares)} share(s) of the {what} of client {node} arrived, "
                f"{threshold} are needed",
            )
        holders = sorted(shares)
        problems = []
        for tried, subset in enumerate(itertools.combinations(holders, threshold)):
            if tried == MAX_SUBSETS:
                problems.append(f"gave up after {MAX_SUBSETS} subsets")
                break
            chosen = {holder: shares[holder] for holder in subset}
            try:
                secret = combine_shares(chosen, threshold, size)
            except ShamirError as error:
                problems.append(str(error))
                continue
            if not valid(secret):
                continue
            for holder in holders:
                if holder not in chosen and evaluate_at(chosen, holder) != shares[holder]:
                    self._reject(
                        stage,
                        holder,
                        "BAD_SHARE",
                        f"its share of the {what} of client {node} is not on the polynomial "
                        f"that {threshold} other shares define and that the committed value "
                        "verifies",
                    )
            return secret
        self._abort(
            stage,
            f"no {threshold} of the {len(shares)} shares of the {what} of client {node} "
            f"rebuild the committed value{': ' + problems[-1] if problems else ''}",
            reason="CORRUPT_SHARES",
        )

    # -- intake and bookkeeping --------------------------------------------------------------

    def _begin(self, stage: Stage) -> Stage:
        if self._aborted:
            raise ProtocolError(
                "ABORTED",
                f"round {self.server_round} was aborted; start a new SecAggServer for the next "
                "round",
            )
        if stage != self._next:
            expected = "nothing (the round is finished)" if self._next is None else self._next.label
            raise ProtocolError(
                "WRONG_STAGE", f"the server expects {expected}, got {stage.label} replies"
            )
        return stage

    def _intake(
        self,
        stage: Stage,
        messages: Iterable[Any],
        kind: type[M],
        check: Callable[[M], str | tuple[str, str] | None],
    ) -> dict[int, M]:
        """Valid replies by sender; everything else goes to :attr:`rejections`."""
        by_sender: dict[int, list[M]] = {}
        for message in messages:
            sender = getattr(message, "sender", None)
            if not isinstance(message, kind):
                self._reject(stage, sender, "MALFORMED", f"expected a {kind.__name__}")
            elif message.server_round != self.server_round:  # type: ignore[attr-defined]
                self._reject(
                    stage,
                    sender,
                    "WRONG_ROUND",
                    f"reply for round {message.server_round!r}, "  # type: ignore[attr-defined]
                    f"this is round {self.server_round}",
                )
            elif (
                isinstance(sender, bool)
                or not isinstance(sender, int)
                or sender not in self._active
            ):
                self._reject(stage, sender, "UNEXPECTED_SENDER", "not a client of this stage")
            else:
                by_sender.setdefault(sender, []).append(message)
        accepted: dict[int, M] = {}
        for sender, replies in by_sender.items():
            if len(replies) > 1:
                self._reject(
                    stage, sender, "DUPLICATE", f"{len(replies)} replies; all are discarded"
                )
            elif problem := check(replies[0]):
                reason, detail = problem if isinstance(problem, tuple) else ("MALFORMED", problem)
                self._reject(stage, sender, reason, detail)
            else:
                accepted[sender] = replies[0]
        return accepted

    def _check_advert(self, advert: KeyAdvertisement) -> str | tuple[str, str] | None:
        try:
            keys = (advert.keys.mask, advert.keys.encryption)
        except AttributeError:
            return "expected a PublicKeys pair"
        for key in keys:
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                return f"invalid public keys: an X25519 public key is {KEY_BYTES} raw bytes"
            try:
                check_public_key(key)
            except ValueError as error:
                return "BAD_PUBLIC_KEY", str(error)
        return None

    def _check_bundle(self, bundle: ShareBundle) -> str | None:
        neighbours = self._graph[bundle.sender]
        targets = set(bundle.ciphertexts)
        if targets != neighbours:
            return f"shares addressed to {sorted(targets)}, neighbours are {sorted(neighbours)}"
        sizes = {len(c) if isinstance(c, bytes) else -1 for c in bundle.ciphertexts.values()}
        if sizes - {CIPHERTEXT_BYTES}:
            return f"ciphertexts must be {CIPHERTEXT_BYTES} bytes, got sizes {sorted(sizes)}"
        commitment = getattr(bundle, "commitment", None)
        if not isinstance(commitment, bytes) or len(commitment) != COMMITMENT_BYTES:
            return f"the commitment to the self-mask seed must be {COMMITMENT_BYTES} bytes"
        return None

    def _check_masked(self, reply: MaskedInput) -> str | None:
        masked = reply.masked
        expected = (self.vector_size + 1,)
        if (
            not isinstance(masked, np.ndarray)
            or masked.dtype != np.uint32
            or masked.shape != expected
        ):
            return (
                f"expected a uint32 array of shape {expected}, got "
                f"{getattr(masked, 'dtype', type(masked).__name__)} "
                f"{getattr(masked, 'shape', '')}"
            )
        complaints, peers = reply.no_shares_of, self._peers[reply.sender]
        if not isinstance(complaints, frozenset) or not complaints <= peers:
            return (
                f"no_shares_of must name peers the sender masked with "
                f"({sorted(peers)}), got {complaints!r:.80}"
            )
        early = complaints and len(peers - complaints) >= self._require_group().threshold - 1
        if set(reply.pair_seeds) != (complaints if early else set()) or any(
                not isinstance(seed, bytes) or len(seed) != SEED_BYTES
                for seed in reply.pair_seeds.values()):
            return "pairwise seeds must be given, 32 bytes each, for exactly the peers in " \
                   "no_shares_of (when t − 1 others are readable)"
        return None

    def _check_unmask(self, reply: UnmaskResponse) -> str | None:
        request = self._requests[reply.sender]
        unreadable = self._unreadable.get(reply.sender, frozenset())
        if set(reply.self_mask_shares) != request.survivors - unreadable:
            return "self-mask shares do not match the survivors in the request"
        if set(reply.mask_key_shares) != request.dropped - unreadable:
            return "mask-key shares do not match the dropped peers in the request"
        threshold = self._require_group().threshold
        revealed = self._revealed.get(reply.sender, frozenset())
        reveals = reveals_pair_seeds(request.survivors, request.dropped, reply.sender,
                                     revealed, threshold)
        if set(reply.pair_seeds) != (request.dropped - revealed if reveals else set()):
            return "pairwise seeds do not match the dropped peers in the request"
        shares = [*reply.self_mask_shares.values(), *reply.mask_key_shares.values()]
        if any(not isinstance(s, bytes) or len(s) != SHARE_BYTES for s in shares):
            return f"shares must be {SHARE_BYTES} bytes each"
        if any(not isinstance(s, bytes) or len(s) != SEED_BYTES
               for s in reply.pair_seeds.values()):
            return f"pairwise seeds must be {SEED_BYTES} bytes each"
        return None

    def _drop_repeated_keys(
        self, stage: Stage, accepted: dict[int, KeyAdvertisement]
    ) -> dict[int, KeyAdvertisement]:
        """Reject every client whose public key also appears elsewhere (copied or replayed)."""
        owners: dict[bytes, set[int]] = {}
        for node, advert in accepted.items():
            for key in (advert.keys.mask, advert.keys.encryption):
                owners.setdefault(key, set()).add(node)
        clash = {node for holders in owners.values() if len(holders) > 1 for node in holders}
        for node in sorted(clash):
            self._reject(stage, node, "DUPLICATE_KEY", "public key shared with another client")
        return {node: advert for node, advert in accepted.items() if node not in clash}

    def _prune(self, stage: Stage, survivors: frozenset[int]) -> frozenset[int]:
        """Drop clients with fewer than ``t`` share holders left, until none remain."""
        threshold = self._require_group().threshold
        while thin := {n for n in survivors if len(self._graph[n] & survivors) + 1 < threshold}:
            for node in sorted(thin):
                self._reject(
                    stage,
                    node,
                    "TOO_FEW_NEIGHBOURS",
                    f"{len(self._graph[node] & survivors)} neighbour(s) left, needs "
                    f"{threshold - 1}",
                )
            survivors -= thin
        return survivors

    def _advance(self, stage: Stage, survivors: frozenset[int]) -> None:
        self._dropped[stage] = self._active - survivors
        self._active = survivors
        self._next = Stage(stage + 1) if stage < Stage.UNMASK else None

    def _require_threshold(self, stage: Stage, survivors: frozenset[int]) -> None:
        threshold = self._require_group().threshold
        if len(survivors) < threshold:
            self._abort(
                stage,
                f"{len(survivors)} client(s) remain after this stage, the threshold is {threshold}",
            )

    def _require_group(self) -> GroupParameters:
        if self._group is None:
            raise ProtocolError("WRONG_STAGE", "keys have not been collected yet")
        return self._group

    def _reject(self, stage: Stage, node: Any, reason: str, detail: str) -> None:
        self._rejections.append(Rejection(stage=stage, node=node, reason=reason, detail=detail))

    def _abort(self, stage: Stage, message: str, reason: str = "BELOW_THRESHOLD",
               hint: str | None = None) -> NoReturn:
        self._abort_quietly()
        raise SecAggAborted(stage.label, self.server_round, message, reason=reason, hint=hint)

    def _abort_quietly(self) -> None:
        self._aborted, self._next = True, None
        self._masked_total = np.zeros(0, dtype=np.uint32)
