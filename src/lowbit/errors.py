"""The one exception type that lowbit raises for bad user input.

The CLI prints ``LowbitError`` messages as a single line and exits with code 2; every
message names the offending value and what to do instead.
"""


class LowbitError(ValueError):
    """Bad input: a missing path, an unknown scheme, an impossible spec, non-finite weights."""
