"""Number formats: one module per family (``int``, ``float``, ``grid``, ``micro``, ``binary``) on one
contract (``base``); ``registry`` names them all."""
from lowbit.formats.base import Format, QParams  # noqa: F401
from lowbit.formats.registry import FAMILIES, all_formats, format_from_dict, get_format, register_preset  # noqa: F401
