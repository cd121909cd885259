"""lowbit's version, written into every saved folder and export (kept equal to pyproject.toml's)."""
__version__ = "0.1.0"
