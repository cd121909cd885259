"""Hugging Face integration: the only package that imports transformers (always lazily)."""
