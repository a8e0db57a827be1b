"""The ``fedlora`` command line."""
