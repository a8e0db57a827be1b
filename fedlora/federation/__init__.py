"""The federation's state and wire: what a client may send, arrays on the wire, the global adapter,
checkpoints, the fast mean, a run's outputs."""
