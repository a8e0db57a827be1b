"""Privacy and security: differential privacy, secure aggregation (``secagg``) and signed
updates."""
