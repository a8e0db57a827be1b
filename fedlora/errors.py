"""Domain exceptions: each message says what was expected, what arrived and what to change."""


class FedLoraError(Exception):
    """Base class of fedlora's own errors."""


class ConfigError(FedLoraError, ValueError):
    """A run configuration, model or data source is invalid."""


class DataError(FedLoraError, ValueError):
    """Client data is missing, unreadable or empty."""


class PayloadError(FedLoraError, ValueError):
    """A message payload does not match the adapter it claims to carry."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"[{reason}] {message}")
        self.reason = reason
