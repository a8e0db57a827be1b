"""Many virtual clients with sampling, through the real ServerApp strategy and ClientApp."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
from fl_harness import tiny_config

from clients.app import PERSONAL
from clients.app import app as client_app
from fedlora import config
from fedlora.federation.transport import unpack
from fedlora.learning.evaluator import ServerModel
from server.inprocess import InProcessGrid
from server.strategy import FederatedLora, NodeInfo

NODES = 60
SAMPLED = 6
ROUNDS = 5


def _personal(context) -> dict[str, np.ndarray] | None:
    if PERSONAL not in context.state:
        return None
    return {k: v.copy() for k, v in unpack(context.state[PERSONAL]).items()}


def test_sixty_clients_only_sampled_ones_train_and_personal_b_survives_skipped_rounds():
    # Prepare: FedSA (B stays on each client, in its context.state), 6 of 60 nodes per round;
    # record the personal B each node holds when a train message arrives and when it replies
    flat = tiny_config(strategy="fedsa", num_server_rounds=ROUNDS, num_train_nodes=SAMPLED)
    cfg = config.from_flat(flat)
    held_before: dict[tuple[int, int], dict | None] = {}  # (round, partition) -> B
    held_after: dict[tuple[int, int], dict | None] = {}

    def recording_app(msg, context):
        if msg.metadata.message_type != "train":
            return client_app(msg, context)
        key = (int(msg.content["config"]["server-round"]), context.node_config["partition-id"])
        held_before[key] = _personal(context)
        reply = client_app(msg, context)
        held_after[key] = _personal(context)
        return reply

    grid = InProcessGrid(recording_app, [{"partition-id": i, "num-partitions": NODES}
                                         for i in range(NODES)], flat)
    server_model = ServerModel(cfg, cfg.fl.max_rank)
    records: list[dict] = []
    strategy = FederatedLora(cfg, server_model.initial_global(), server_model.evaluate,
                             records.append)

    # Execute
    strategy.run(grid)

    # Assert 1: each round trained exactly the nodes the seeded sampler drew, all accepted
    infos = sorted((NodeInfo(nid, int(c.node_config["partition-id"]), 8)
                    for nid, c in grid.contexts.items()), key=lambda n: n.partition_id)
    trained = defaultdict(set)
    for rnd, pid in held_before:
        trained[rnd].add(pid)
    for rnd in range(1, ROUNDS + 1):
        drawn = {n.partition_id for n in strategy.sample(infos, rnd)}
        assert trained[rnd] == drawn and len(drawn) == SAMPLED
        assert records[rnd]["clients"] == sorted(drawn) and records[rnd]["num_accepted"] == SAMPLED

    # Assert 2: messages are O(sampled) per round: one capability query per node at start-up,
    # then per round SAMPLED train messages and SAMPLED personal evaluations (round 0 too),
    # and once at the end one FedSA personal-adapter export per node (global A for its B)
    kinds = Counter(m.metadata.message_type for m in grid.delivered)
    assert kinds == {"query.capabilities": NODES, "train": ROUNDS * SAMPLED,
                     "evaluate": (ROUNDS + 1) * SAMPLED, "query.personal_export": NODES}
    assert all(r["fed_eval_clients"] == SAMPLED for r in records)

    # Assert 3: a node never sampled holds no personal state; a sampled one holds its own B
    ever = set().union(*trained.values())
    for context in grid.contexts.values():
        assert (_personal(context) is not None) == (context.node_config["partition-id"] in ever)

    # Assert 4: when a node trains again, it starts from exactly the B it kept the last time,
    # however many rounds it sat out; and that B is its own (trained, non-zero, unlike others)
    last: dict[int, int] = {}
    skipped = 0
    for rnd, pid in sorted(held_before):
        if pid in last:
            kept, now = held_after[(last[pid], pid)], held_before[(rnd, pid)]
            assert kept.keys() == now.keys()
            assert all(np.array_equal(kept[k], now[k]) for k in kept)
            assert any(np.any(v != 0) for v in now.values())
            skipped += rnd - last[pid] > 1
        else:
            assert held_before[(rnd, pid)] is None
        last[pid] = rnd
    assert skipped >= 1, "no node sat out a round between two trainings; change SAMPLED/ROUNDS"
    final = {pid: held_after[(rnd, pid)] for pid, rnd in last.items()}
    first, second = sorted(final)[:2]
    key = next(iter(final[first]))
    assert not np.array_equal(final[first][key], final[second][key])
