"""Number formats: one module per family, each registering its named presets on import."""
from lowbit.formats.base import (  # noqa: F401
    Format,
    QParams,
    all_formats,
    format_from_dict,
    get_format,
    register_preset,
)
from lowbit.formats import int as _int  # noqa: F401
from lowbit.formats import float as _float  # noqa: F401
from lowbit.formats import grid as _grid  # noqa: F401
from lowbit.formats import micro as _micro  # noqa: F401
from lowbit.formats import binary as _binary  # noqa: F401
