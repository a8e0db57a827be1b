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

import secrets
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NoReturn

import numpy as np

from fedlora.errors import ConfigError
from fedlora.privacy.secagg.config import GroupParameters, SecAggConfig
from fedlora.privacy.secagg.encoding import FixedPointCodec, OutOfRange
from fedlora.privacy.secagg.errors import ProtocolError, SecAggAborted
from fedlora.privacy.secagg.graph import neighbour_graph
from fedlora.privacy.secagg.ids import check_participants, check_round
from fedlora.privacy.secagg.keys import (
    KEY_BYTES,
    PublicKeys,
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
from fedlora.privacy.secagg.recovery import (
    SecureSum,
    rebuild_secret,
    remove_pair_masks,
    stranded_masks,
    sum_problem,
    unrecoverable_inputs,
)
from fedlora.privacy.secagg.replies import (
    M,
    Problem,
    Rejection,
    check_advert,
    check_bundle,
    check_masked,
    check_unmask,
    repeated_keys,
    sort_replies,
)

GRAPH_SEED_BYTES = 32


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
        self.participants = check_participants(participants)
        if isinstance(vector_size, bool) or not isinstance(vector_size, int) or vector_size < 1:
            raise ValueError(f"vector_size must be an int ≥ 1, got {vector_size!r}")
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
        accepted = self._intake(stage, adverts, KeyAdvertisement, check_advert)
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
        accepted = self._intake(stage, bundles, ShareBundle,
                               lambda bundle: check_bundle(bundle, self._graph[bundle.sender]))
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
        threshold = self._require_group().threshold
        accepted = self._intake(stage, inputs, MaskedInput, lambda reply: check_masked(
            reply, self.vector_size, self._peers[reply.sender], threshold))
        self._unreadable = {node: accepted[node].no_shares_of for node in accepted}
        self._revealed = {node: frozenset(accepted[node].pair_seeds) for node in accepted}
        self._early_seeds = {(node, peer): seed for node in accepted
                             for peer, seed in accepted[node].pair_seeds.items()}
        survivors = frozenset(accepted)
        while excluded := unrecoverable_inputs(survivors, self._peers, self._unreadable,
                                               threshold):
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
        for node in sorted(self._peers):
            if problem := stranded_masks(node, survivors, self._peers, self._unreadable,
                                         self._early_seeds, self._revealed, threshold):
                self._abort(stage, problem)
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
        accepted = self._intake(stage, responses, UnmaskResponse, lambda reply: check_unmask(
            reply, self._requests[reply.sender], self._unreadable.get(reply.sender, frozenset()),
            self._revealed.get(reply.sender, frozenset()), self._require_group().threshold))
        responders = frozenset(accepted)
        self._advance(stage, responders)
        self._require_threshold(stage, responders)
        total, self._masked_total = self._masked_total, np.zeros(0, dtype=np.uint32)
        for node in sorted(contributors):
            apply_mask(total, self._self_mask_seed(stage, node, accepted, responders), -1)
        for node in sorted(set(self._peers) - contributors):
            self._remove_pair_masks(stage, node, accepted, contributors, responders, total)
        return self._decode(stage, total, contributors, declared_weights)

    def _self_mask_seed(self, stage: Stage, node: int, accepted: Mapping[int, UnmaskResponse],
                        responders: frozenset[int]) -> bytes:
        """``b_u`` of contributor ``node``, rebuilt from the responders' self-mask shares and
        checked against its stage-1 commitment."""
        holders = (self._peers[node] | {node}) & responders
        shares = {
            holder: accepted[holder].self_mask_shares[node]
            for holder in holders
            if node in accepted[holder].self_mask_shares
        }
        commitment, keys = self._commitments[node], self._keys[node]
        return self._rebuild(
            stage, node, "self-mask seed", shares, SEED_BYTES,
            lambda seed: commit(seed, keys, server_round=self.server_round, node_id=node)
            == commitment,
        )

    def _remove_pair_masks(self, stage: Stage, node: int, accepted: Mapping[int, UnmaskResponse],
                           contributors: frozenset[int], responders: frozenset[int],
                           total: np.ndarray) -> None:
        """Remove from ``total`` the pairwise masks of dropped client ``node`` with the
        contributors: with its mask key rebuilt from the responders' shares, or, when every
        such peer sent one, with the pairwise seeds they revealed."""
        masked_with = self._peers[node] & contributors
        if not masked_with:
            return
        group = self._require_group()
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
                lambda raw: public_bytes(load_private_key(raw)) == advertised,
            )
            private = load_private_key(raw)
        elif set(seeds) != masked_with:
            self._abort(
                stage,
                f"the masks of dropped client {node} cannot be removed: {len(shares)} "
                f"share(s) of its mask key arrived ({group.threshold} needed) and "
                f"{sorted(masked_with - set(seeds))} sent no pairwise seed",
            )
        remove_pair_masks(total, node, masked_with, private, self._keys, seeds, self.server_round)

    def _decode(self, stage: Stage, total: np.ndarray, contributors: frozenset[int],
                declared_weights: Mapping[int, float] | None) -> SecureSum:
        """The unmasked ring sum decoded, once :func:`sum_problem` finds it possible."""
        group = self._require_group()
        codec = FixedPointCodec(self.config.clip_range, self.config.max_weight, group.num_clients)
        try:
            decoded = codec.decode(total, len(contributors))
        except OutOfRange as error:
            self._abort(stage, str(error), reason="OUT_OF_RANGE",
                        hint="a client sent a bad masked input or share; see the rejections")
        error_bound = codec.error_bound(len(contributors))
        declared = (None if declared_weights is None
                    else float(sum(declared_weights[node] for node in contributors)))
        problem = sum_problem(decoded, self.config.clip_range,
                              codec.weight_error_bound(len(contributors)), error_bound, declared,
                              len(contributors))
        if problem:
            reason, message, hint = problem
            self._abort(stage, message, reason=reason, hint=hint)
        return SecureSum(
            server_round=self.server_round,
            weighted_sum=decoded.weighted_sum,
            total_weight=decoded.total_weight,
            contributors=contributors,
            dropped=MappingProxyType(dict(self._dropped)),
            error_bound=error_bound,
        )

    def _rebuild(self, stage: Stage, node: int, what: str, shares: Mapping[int, bytes],
                 size: int, valid: Callable[[bytes], bool]) -> bytes:
        """The ``what`` (e.g. "mask key") of ``node`` from ``t`` of ``shares`` that passes
        ``valid`` (:func:`~fedlora.privacy.secagg.recovery.rebuild_secret`); a holder whose
        share lies off the polynomial of that secret is rejected as ``BAD_SHARE``."""
        rebuilt = rebuild_secret(shares, self._require_group().threshold, size, valid,
                                 what=f"{what} of client {node}")
        for holder in rebuilt.off_polynomial:
            self._reject(stage, holder, "BAD_SHARE", rebuilt.off_polynomial_detail)
        if rebuilt.secret is None:
            self._abort(stage, rebuilt.problem, reason=rebuilt.reason)
        return rebuilt.secret

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
        check: Callable[[M], Problem],
    ) -> dict[int, M]:
        """Valid replies by sender (:func:`sort_replies`); the rest go to :attr:`rejections`."""
        accepted, rejections = sort_replies(stage, messages, kind, self.server_round,
                                            self._active, check)
        self._rejections.extend(rejections)
        return accepted

    def _drop_repeated_keys(
        self, stage: Stage, accepted: dict[int, KeyAdvertisement]
    ) -> dict[int, KeyAdvertisement]:
        """Reject every client whose public key also appears elsewhere (copied or replayed)."""
        clash = repeated_keys(accepted)
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
