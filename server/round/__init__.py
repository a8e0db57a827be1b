"""The stages of one federated round, one module per job, in the order a round runs them.

:mod:`~server.round.plan` (what the round asks) → :mod:`~server.round.sampling` (which nodes)
→ :mod:`~server.round.messages` (one message per node) → send/receive (the ``Grid``) →
:mod:`~server.round.replies` (the per-reply boundary: signature, then
:mod:`~server.round.validate` and :mod:`~server.round.clip`) → :mod:`~server.round.noise`
(central DP) → :mod:`~server.round.aggregate` (weights, the rule, adopt) →
:mod:`~server.round.diagnose` (the metrics line) → :mod:`~server.round.evaluate` (evaluate and
log). :mod:`~server.round.secure` replaces send/receive through aggregate with a secure round.
:class:`server.strategy.FederatedLora` holds the state between rounds and runs the stages.
"""
