"""Folder calibration sources: a ``datasets.save_to_disk`` folder, or a folder of text files.

A folder holding ``dataset_info.json``, ``state.json`` or ``dataset_dict.json`` is read with
``datasets.load_from_disk`` (Arrow files; no pickle). Any other folder contributes every
``.txt``, ``.md`` and ``.jsonl`` file below it, in sorted relative-path order, hidden names
skipped; other files (``.pkl`` included) are never opened.
"""
from __future__ import annotations

from pathlib import Path

from lowbit.calib.jsonl import read_jsonl
from lowbit.calib.text import read_text
from lowbit.errors import LowbitError

HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
TEXT_SUFFIXES = (".txt", ".md")


def read_folder(path: str | Path, key: str = "text") -> list[str]:
    """Texts of a folder source: dataset rows, or files in sorted order (JSONL records in line order)."""
    path = Path(path)
    if not path.is_dir():
        raise LowbitError(f"calibration folder {str(path)!r} does not exist or is not a folder")
    if is_hf_dataset(path):
        return read_hf_dataset(path, key)
    files = folder_files(path)
    if not files:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise LowbitError(f"calibration folder {str(path)!r} has no .txt, .md or .jsonl files (found: "
                          f"{found}); add text files, or point at a datasets.save_to_disk folder")
    texts: list[str] = []
    for f in files:
        texts.extend(read_jsonl(f, key) if f.suffix.lower() == ".jsonl" else [read_text(f)])
    return texts


def folder_files(path: Path) -> list[Path]:
    """The ``.txt``/``.md``/``.jsonl`` files below ``path``, sorted by relative path, no hidden names."""
    def wanted(p: Path) -> bool:
        rel = p.relative_to(path).parts
        return p.is_file() and p.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl") and not any(
            part.startswith(".") for part in rel)

    return sorted((p for p in path.rglob("*") if wanted(p)), key=lambda p: p.relative_to(path).as_posix())


def is_hf_dataset(path: Path) -> bool:
    """Whether ``path`` looks like a folder written by ``datasets``' ``save_to_disk``."""
    return any((path / m).is_file() for m in HF_MARKERS)


def read_hf_dataset(path: Path, key: str = "text") -> list[str]:
    """The ``key`` column of a saved dataset; a ``DatasetDict`` gives its ``train`` split (or its only one)."""
    try:
        import datasets
    except ImportError:
        raise LowbitError(f"{path} is a Hugging Face datasets folder; reading it needs the datasets "
                          "package: pip install datasets") from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        data = _pick_split(data, path)
    if key not in data.column_names:
        raise LowbitError(f"dataset {path} has no {key!r} column (columns: {', '.join(data.column_names)}); "
                          f"name the text column as {path}#COLUMN in the calibration spec")
    texts = data[key]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise LowbitError(f"dataset {path} row {bad}: {key!r} holds a {type(texts[bad]).__name__}, not a string")
    return list(texts)


def _pick_split(data, path: Path):
    splits = list(data.keys())
    if "train" in splits:
        return data["train"]
    if len(splits) == 1:
        return data[splits[0]]
    raise LowbitError(f"dataset {path} has splits {', '.join(splits)} and none is 'train'; point at one "
                      f"split's folder, e.g. {path / splits[0]}")
