"""A second evaluation corpus from another domain: public-domain English prose from PyPI.

The pydoc topics (``lowbit.eval.corpus``) are technical text with code. This module adds
English prose: the two prose texts of the Canterbury compression corpus, as they ship in the
test data of the source distribution of ``brotli`` 1.2.1 on PyPI (``brotli-1.2.1.tar.gz``,
``tests/testdata/``):

* ``alice29.txt``: Lewis Carroll, *Alice's Adventures in Wonderland* (1865), the Millennium
  Fulcrum Edition 2.9 etext; narrative fiction, 12 chapters.
* ``lcet10.txt``: *Workshop on Electronic Texts: Proceedings*, ed. James Daly, Library of
  Congress, 9-10 June 1992 (Project Gutenberg etext); reported discussion, 1990s expository
  prose.

Licence: both texts are in the public domain (an 1865 book; a work of the U.S. Library of
Congress, distributed by Project Gutenberg). The ``brotli`` package that carries them is MIT
licensed. The verse (``plrabn12.txt``, *Paradise Lost*) and the play (``asyoulik.txt``) of the
same corpus are left out: they are not prose.

Nothing is installed. On first use ``pip download --no-deps --no-binary brotli brotli==1.2.1``
(about 7 MiB) fetches the sdist into a temporary folder of the cache, the two files are read out
of the archive, their SHA-256 is checked against the hashes pinned here, and they are kept in
``$LOWBIT_CACHE/corpora/brotli-1.2.1/`` (default ``~/.cache/lowbit``, or ``$XDG_CACHE_HOME/lowbit``)
with atomic writes; later calls read the cache. A ``brotli-1.2.1.tar.gz`` placed in that folder by
hand is used without any download.

Cleaning (deterministic, on the verified bytes): CRLF becomes LF; every line is stripped of
leading and trailing blanks (the hard line wrapping of the etexts is kept, and so are their
two spaces after a full stop and Alice's `...' quotes); gaps of three or more spaces (column
layout) become one; lines of only ``*`` (scene breaks) and the DOS end-of-file byte are dropped;
runs of blank lines become one. *Alice* loses its title block and the closing ``THE END`` and
is cut into its 12 chapters (each keeps its ``CHAPTER N`` heading and title). The proceedings keep the
introduction, the proceedings and the abstracts (Appendix II), cut into sections at the
etext's ``******`` and ``SESSION`` dividers; the Project Gutenberg header and end line, the title
page, contents, acknowledgements, the programme (Appendix I), the directory of participants
(Appendix III), the transcriber's notes and the ``+++``-boxed keyword summaries that precede each
talk are removed.

    >>> from corpora import prose_text, prose_split
    >>> calib, evaluation = prose_split()

API:

* ``prose_books() -> dict[str, list[str]]``: ``{"alice": chapters, "lcet10": sections}``.
* ``prose_documents(books=BOOKS) -> list[str]``: every document, Alice's chapters first.
* ``prose_text(books=BOOKS) -> str``: all documents joined with a blank line.
* ``prose_split(books=BOOKS) -> (calibration_half, evaluation_half)``: see its docstring.
* ``prose_calibration_file(path) -> Path``: the calibration half as a text file, for ``--calib``.
* ``raw_files() -> dict[str, bytes]``: the verified files as shipped; ``cache_dir() -> Path``.

``BOOKS = ("alice", "lcet10")``; pass ``books=("lcet10",)`` for the proceedings alone.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lowbit.errors import LowbitError

PACKAGE = "brotli"
VERSION = "1.2.1"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
MEMBER_DIR = "tests/testdata"
# SHA-256 of the files exactly as they lie in the sdist (before cleaning).
FILES = {
    "alice29.txt": "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
    "lcet10.txt": "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
}
DOC_SEPARATOR = "\n\n"
PIP_TIMEOUT_S = 900


def cache_dir() -> Path:
    """``$LOWBIT_CACHE/corpora``; ``LOWBIT_CACHE`` defaults to ``$XDG_CACHE_HOME/lowbit`` or ``~/.cache/lowbit``."""
    root = os.environ.get("LOWBIT_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "lowbit")
    return Path(root).expanduser() / "corpora"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the pinned sdist into ``dest``; return the archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
           "--disable-pip-version-check", "--quiet", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    manual = (f"fetch it by hand with `pip download --no-deps --no-binary {PACKAGE} -d "
              f"{cache_dir()} {PACKAGE}=={VERSION}` and rerun")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LowbitError(f"downloading the prose corpus ({PACKAGE}=={VERSION} from PyPI) took over "
                          f"{PIP_TIMEOUT_S} s; check the network, or {manual}") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        tail = " | ".join([ln for ln in lines if ln.startswith("ERROR")] or lines[-3:])[:500]
        raise LowbitError(f"could not download the prose corpus: `{' '.join(cmd[1:])}` exited with "
                          f"{proc.returncode} ({tail or 'no output'}); check that PyPI is reachable, or {manual}")
    found = sorted(dest.glob(f"{PACKAGE}-{VERSION}.tar.gz")) or sorted(dest.glob("*.tar.gz"))
    if not found:
        raise LowbitError(f"pip download of {PACKAGE}=={VERSION} produced no source archive in {dest} "
                          f"(got {sorted(p.name for p in dest.iterdir())}); {manual}")
    return found[0]


def _read_members(archive: Path) -> dict[str, bytes]:
    """The pinned files' bytes from the sdist ``archive``, hash-checked."""
    wanted = {f"{PACKAGE}-{VERSION}/{MEMBER_DIR}/{name}": name for name in FILES}
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name)
                if name is not None and member.isfile():
                    out[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise LowbitError(f"{archive} is not a readable {SDIST} ({e}); delete it and rerun") from None
    missing = sorted(set(FILES) - set(out))
    if missing:
        raise LowbitError(f"{archive} lacks {', '.join(missing)} under {MEMBER_DIR}/; it is not the "
                          f"{SDIST} this corpus is pinned to; delete it and rerun")
    for name, data in out.items():
        if _sha256(data) != FILES[name]:
            raise LowbitError(f"{name} in {archive} has SHA-256 {_sha256(data)}, expected {FILES[name]}; "
                              f"the archive is not the pinned {SDIST}; delete it and rerun")
    return out


def raw_files() -> dict[str, bytes]:
    """The two corpus files as shipped (verified bytes), downloading them on first use."""
    folder = cache_dir() / f"{PACKAGE}-{VERSION}"
    cached = {}
    for name, digest in FILES.items():
        path = folder / name
        if path.is_file():
            data = path.read_bytes()
            if _sha256(data) == digest:
                cached[name] = data
    if len(cached) == len(FILES):
        return cached
    manual_archive = cache_dir() / SDIST
    if manual_archive.is_file():
        files = _read_members(manual_archive)
    else:
        cache_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".download-") as tmp:
            files = _read_members(_download_sdist(Path(tmp)))
    for name, data in files.items():
        _write_atomic(folder / name, data)
    return files


def _normalize(text: str) -> str:
    """LF line ends; each line stripped, column gaps (3+ spaces) made one space; lines of
    nothing but ``*`` (scene breaks) and the DOS end-of-file byte dropped; runs of blank lines
    collapsed to one; ends trimmed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x1a", "")
    lines = [re.sub(r" {3,}", " ", line.strip()) for line in text.split("\n")]
    lines = ["" if re.fullmatch(r"[*\s]+", line) else line for line in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _alice_chapters(raw: str) -> list[str]:
    text = raw.replace("\r\n", "\n")
    parts = re.split(r"(?m)^(?=[ \t]*CHAPTER [IVXLC]+[ \t]*$)", text)
    chapters = [_normalize(p) for p in parts[1:]]  # parts[0]: the title block
    last = chapters[-1]
    if last.endswith("THE END"):
        chapters[-1] = last[: -len("THE END")].rstrip()
    if len(chapters) != 12:
        raise LowbitError(f"alice29.txt split into {len(chapters)} chapters, expected 12")
    return chapters


_BIG_RULE = re.compile(r"(?m)^[ \t]*\*\*\*[ \t]+\*\*\*[ \t]+\*\*\*[ \t]+\*{6}[ \t]+\*\*\*[ \t]+\*\*\*[ \t]+\*\*\*[ \t]*$")
_SMALL_RULE = re.compile(r"(?m)^[ \t]*\*{6}[ \t]*$")
_PLUS_BOX = re.compile(r"(?ms)^\+{20,}[ \t]*$.*?^\+{20,}[ \t]*$")
_SESSION = re.compile(r"(?m)^(?=SESSION [IVX]+(?:-[A-Z])?\b)")


def _lcet10_sections(raw: str) -> list[str]:
    text = raw.replace("\r\n", "\n")
    parts = {}
    for part in _BIG_RULE.split(text):
        body = part.strip("\n")
        heading = next((ln.strip() for ln in body.split("\n") if ln.strip()), "")
        parts[heading] = body
    wanted = ["INTRODUCTION", "PROCEEDINGS", "Appendix II:  ABSTRACTS"]
    missing = [h for h in wanted if h not in parts]
    if missing:
        raise LowbitError(f"lcet10.txt has no part headed {missing}; the cleaning rules no longer fit")
    intro = parts["INTRODUCTION"]
    proceedings = parts["PROCEEDINGS"].split("\n", 1)[1]  # drop the heading
    abstracts = parts["Appendix II:  ABSTRACTS"].split("\n", 1)[1]
    sections = [intro]
    sections += _SMALL_RULE.split(_PLUS_BOX.sub("", proceedings))
    sections += _SESSION.split(abstracts)
    docs = [_normalize(s) for s in sections]
    return [d for d in docs if len(d) > 200]  # drops empty pieces between adjacent rules


BOOKS = ("alice", "lcet10")


def prose_books() -> dict[str, list[str]]:
    """``{"alice": 12 chapters, "lcet10": 60 sections of the proceedings}``, cleaned (module docstring)."""
    raw = {name: data.decode("ascii") for name, data in raw_files().items()}
    return {"alice": _alice_chapters(raw["alice29.txt"]), "lcet10": _lcet10_sections(raw["lcet10.txt"])}


def _chosen(books: Sequence[str]) -> list[list[str]]:
    if isinstance(books, str):
        books = (books,)
    unknown = [b for b in books if b not in BOOKS]
    if unknown or not books:
        raise LowbitError(f"unknown prose book(s) {unknown or list(books)}; choose from {list(BOOKS)}")
    all_books = prose_books()
    return [all_books[b] for b in dict.fromkeys(books)]


def prose_documents(books: Sequence[str] = BOOKS) -> list[str]:
    """Every document of ``books``, book by book, each in its own order (Alice's chapters first by default)."""
    return [doc for book in _chosen(books) for doc in book]


def prose_text(books: Sequence[str] = BOOKS) -> str:
    """All documents (``prose_documents``) joined with a blank line."""
    return DOC_SEPARATOR.join(prose_documents(books))


def _interleave(lists: list[list[str]]) -> list[str]:
    """Round-robin: first of each list, then second of each, ...; exhausted lists are skipped."""
    out: list[str] = []
    for i in range(max(len(x) for x in lists)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def prose_split(books: Sequence[str] = BOOKS) -> tuple[str, str]:
    """Split the prose into ``(calibration_half, evaluation_half)``, sharing no document.

    Within each book, documents at even positions (0, 2, ...) go to calibration and odd
    positions to evaluation, as ``split_pydoc`` does. With both books each half then alternates
    them (Alice chapter, proceedings section, Alice chapter, ...; the longer book's tail last),
    so a prefix of either half, such as the first 16 windows of 512 tokens, holds both kinds of
    prose. ``books=("lcet10",)`` or ``("alice",)`` keeps one book. Each half is joined with
    ``"\\n\\n"``; together the halves hold every document of ``books`` exactly once.
    """
    chosen = _chosen(books)
    calib = _interleave([book[0::2] for book in chosen])
    evaluation = _interleave([book[1::2] for book in chosen])
    return DOC_SEPARATOR.join(calib), DOC_SEPARATOR.join(evaluation)


def prose_calibration_file(path: Path) -> Path:
    """``path``, holding the calibration half of ``prose_split()`` (written atomically when absent),
    for ``lowbit quantize --calib PATH``: calibration text from the prose domain that no prose
    evaluation window contains."""
    if not path.exists():
        _write_atomic(path, prose_split()[0].encode("utf-8"))
    return path


if __name__ == "__main__":
    books = prose_books()
    calib, evaluation = prose_split()
    print(f"alice: {len(books['alice'])} chapters; lcet10: {len(books['lcet10'])} sections; "
          f"text {len(prose_text())} chars; calibration {len(calib)}, evaluation {len(evaluation)} chars; "
          f"sha256(prose_text) {_sha256(prose_text().encode())}")
