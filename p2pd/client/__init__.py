"""The operator commands (``p2pd pull``, ``preheat``, ``status``, ``doctor``): clients of
a running daemon's mirror port, synchronous, with ``httpx``."""
