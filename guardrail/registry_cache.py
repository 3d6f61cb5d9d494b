"""Local cache of model versions downloaded from a remote registry.

The MLflow and Hub registries return a version's model as a local folder,
because the gate loads models from folders. Each version is downloaded once
into its own folder under ``registry.cache_dir``, and again when a caller
requests a refresh, as ``guardrail audit verify`` does. The download is
checked file by file against the SHA-256 digests recorded at registration
and only then moved into place, so a folder in the cache is always a
complete, verified copy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from guardrail.errors import RegistryError
from guardrail.files import atomic_write_text
from guardrail.hashing import digest_tree

logger = logging.getLogger(__name__)

_MARKER = "verified.json"

#: Writes a version's model files into the given empty folder and returns the folder that contains them.
Downloader = Callable[[Path], Path]


def cached_model(
    folder: Path, files: dict[str, str], model_digest: str, download: Downloader, *, label: str, lock_timeout: float = 600.0, refresh: bool = False
) -> Path:
    """Return a verified local copy of a registered model, downloading it when the cache has none.

    Args:
        folder: Cache folder of this one version; the model lands in ``folder / "model"``.
        files: Relative path to SHA-256 of every model file, as recorded at registration.
            An empty mapping skips the check (a version registered by another tool).
        model_digest: The version's combined digest, stored beside the copy so that a
            different model under the same cache key is downloaded again.
        download: Function that fills a staging folder with the model files.
        label: ``<name> version <N>`` for messages.
        lock_timeout: Seconds to wait for another process downloading the same version.
        refresh: Download and verify again even when the cache contains a verified copy,
            so that the result reflects what the registry stores now. A download that
            fails verification leaves the cached copy as it was.

    Returns:
        The folder that contains the model files and nothing else.

    Raises:
        RegistryError: The download does not match the recorded digests, or the cache is not writable.
    """
    model_folder = folder / "model"
    if not refresh and _is_current(folder, files, model_digest):
        return model_folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / ".lock"), timeout=lock_timeout):
            # Another process may have finished the same download while this one waited.
            if not refresh and _is_current(folder, files, model_digest):
                return model_folder
            staging = Path(tempfile.mkdtemp(prefix=".download.", dir=folder))
            try:
                downloaded = download(staging)
                _verify(downloaded, files, label)
                shutil.rmtree(model_folder, ignore_errors=True)
                (folder / _MARKER).unlink(missing_ok=True)
                os.rename(downloaded, model_folder)
                atomic_write_text(folder / _MARKER, json.dumps({"model_digest": model_digest, "files": sorted(files)}))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except Timeout as exc:
        raise RegistryError(f"another process has been downloading {label} into {folder} for over {lock_timeout:.0f} s; retry later") from exc
    except OSError as exc:
        raise RegistryError(f"cannot write {label} to the cache folder {folder}: {exc.strerror or exc}; check registry.cache_dir and free space") from exc
    logger.info("Downloaded %s into %s", label, model_folder)
    return model_folder


def _is_current(folder: Path, files: dict[str, str], model_digest: str) -> bool:
    """Return True when the marker written after verification matches and every recorded file is still there.

    The contents are not hashed again on reuse: the cache is trusted once a
    download has been verified, like the folders of a local registry.
    """
    marker = folder / _MARKER
    if not marker.is_file() or not (folder / "model").is_dir():
        return False
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if stored.get("model_digest") != model_digest:
        return False
    return all((folder / "model" / relative).is_file() for relative in files)


def _verify(downloaded: Path, files: dict[str, str], label: str) -> None:
    if not files:
        logger.warning("%s has no recorded file digests, so its download is not verified", label)
        return
    actual = digest_tree(downloaded)
    missing = sorted(set(files) - set(actual))
    extra = sorted(set(actual) - set(files))
    changed = sorted(path for path in set(files) & set(actual) if files[path] != actual[path])
    if missing or extra or changed:
        raise RegistryError(
            f"the download of {label} does not match the digests recorded at registration "
            f"(missing: {missing}, unexpected: {extra}, changed: {changed}); "
            "the stored model was altered or the transfer was cut short, so it was not used"
        )
