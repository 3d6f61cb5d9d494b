"""SHA-256 digests of files, folders, texts and JSON documents.

Digests identify every input of a gate run in its report and audit record, so
the same content always yields the same digest whatever its path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

_CHUNK_BYTES = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Return the hex SHA-256 of a text encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(document: Any) -> str:
    """Return the hex SHA-256 of a JSON document in canonical form.

    Keys are sorted and separators fixed, so two equal documents hash equally
    whatever their key order.
    """
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return sha256_text(canonical)


def combine_digests(named_digests: Iterable[tuple[str, str]]) -> str:
    """Return one digest for a set of (name, digest) pairs, independent of order."""
    lines = sorted(f"{name}\t{digest}" for name, digest in named_digests)
    return sha256_text("\n".join(lines))


def digest_tree(root: str | Path, patterns: Iterable[str] = ("*",)) -> dict[str, str]:
    """Hash every regular file under ``root`` that matches one of ``patterns``.

    Returns:
        A mapping from the POSIX path relative to ``root`` to its SHA-256.
    """
    root = Path(root)
    digests: dict[str, str] = {}
    for pattern in patterns:
        for path in sorted(root.rglob(pattern)):
            if path.is_file() and not path.is_symlink():
                digests[path.relative_to(root).as_posix()] = sha256_file(path)
    return digests
