"""Probe sets: the prompts a model is asked during evaluation.

The project ships its own harmful and benign sets (``builtin:harmful``,
``builtin:benign``) and held-out screening sets used while patching
(``builtin:harmful_screen``, ``builtin:benign_screen``). Users can point a
policy at their own CSV or JSONL files; the prompt column is detected from
the names used by common public sets (StrongREJECT ``forbidden_prompt``,
HarmBench ``Behavior``, AdvBench ``goal``) or set explicitly.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from guardrail.errors import ProbeSetError
from guardrail.hashing import sha256_json
from guardrail.policy import ProbeSource

logger = logging.getLogger(__name__)

BUILTIN_SETS = ("harmful", "benign", "harmful_screen", "benign_screen")

#: Column names recognised as the prompt, in order of preference.
PROMPT_COLUMNS = ("prompt", "forbidden_prompt", "Behavior", "behavior", "goal", "question", "instruction", "text")
#: Column names recognised as the category.
CATEGORY_COLUMNS = ("category", "SemanticCategory", "semantic_category", "FunctionalCategory", "type")


@dataclass(frozen=True)
class Probe:
    """One prompt with its origin."""

    id: str
    prompt: str
    category: str = "uncategorized"
    borderline: bool = False


@dataclass
class ProbeSet:
    """A named list of probes with a content digest."""

    name: str
    source: str
    probes: list[Probe]

    @property
    def digest(self) -> str:
        return sha256_json([asdict(probe) for probe in self.probes])

    def __len__(self) -> int:
        return len(self.probes)

    def prompts(self) -> list[str]:
        return [probe.prompt for probe in self.probes]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "count": len(self.probes), "digest": self.digest}


def load_probe_set(source: ProbeSource, name: str, seed: int = 0) -> ProbeSet:
    """Load a probe set from a policy's probe source.

    Args:
        source: A ``builtin:`` name or a file path, with an optional limit and column mapping.
        name: Name of the set in reports ("harmful", "benign").
        seed: Seed for the sample drawn when ``source.limit`` is below the set's size.

    Returns:
        The probe set, sampled but kept in file order.

    Raises:
        ProbeSetError: The file is missing, empty, not UTF-8, or has no prompt column.
    """
    if source.source.startswith("builtin:"):
        probes = _load_builtin(source.source.removeprefix("builtin:"))
    else:
        probes = load_probe_file(source.source, source.prompt_column, source.category_column)

    if source.limit is not None and source.limit < len(probes):
        keep = sorted(random.Random(seed).sample(range(len(probes)), source.limit))
        probes = [probes[index] for index in keep]
    logger.debug("Loaded %d %s probes from %s", len(probes), name, source.source)
    return ProbeSet(name=name, source=source.source, probes=probes)


def _load_builtin(name: str) -> list[Probe]:
    if name not in BUILTIN_SETS:
        raise ProbeSetError(f"unknown built-in probe set 'builtin:{name}'; available: {[f'builtin:{n}' for n in BUILTIN_SETS]}")
    text = resources.files("guardrail").joinpath(f"data/probes/{name}.jsonl").read_text(encoding="utf-8")
    return _parse_jsonl(text, f"builtin:{name}", "prompt", "category")


def load_probe_file(path: str | Path, prompt_column: Optional[str] = None, category_column: Optional[str] = None) -> list[Probe]:
    """Read probes from a CSV or JSONL file.

    Args:
        path: A ``.csv``, ``.jsonl`` or ``.json`` file (one JSON object per line).
        prompt_column: Column holding the prompt; detected from :data:`PROMPT_COLUMNS` when unset.
        category_column: Column holding the category; detected from :data:`CATEGORY_COLUMNS` when unset.

    Returns:
        The probes in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise ProbeSetError(f"probe file not found: {path}; check probes.*.source in the policy")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ProbeSetError(f"{path}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from exc

    suffix = path.suffix.lower()
    if suffix == ".csv":
        probes = _parse_csv(text, str(path), prompt_column, category_column)
    elif suffix in (".jsonl", ".json"):
        probes = _parse_jsonl(text, str(path), prompt_column, category_column)
    else:
        raise ProbeSetError(f"{path}: unsupported probe file type {suffix!r}; use .csv or .jsonl")

    if not probes:
        raise ProbeSetError(f"{path}: the file has no prompts; add at least one row")
    return probes


def _pick_column(columns: list[str], requested: Optional[str], known: tuple[str, ...], source: str, role: str) -> Optional[str]:
    if requested is not None:
        if requested not in columns:
            raise ProbeSetError(f"{source}: {role} column {requested!r} not found; columns are {columns}")
        return requested
    for name in known:
        if name in columns:
            return name
    return None


def _build_probes(rows: list[dict[str, Any]], source: str, prompt_column: Optional[str], category_column: Optional[str]) -> list[Probe]:
    if not rows:
        return []
    columns = list(rows[0].keys())
    prompt_key = _pick_column(columns, prompt_column, PROMPT_COLUMNS, source, "prompt")
    if prompt_key is None:
        raise ProbeSetError(
            f"{source}: no prompt column among {columns}; name it one of {list(PROMPT_COLUMNS)} "
            "or set probes.<set>.prompt_column in the policy"
        )
    category_key = _pick_column(columns, category_column, CATEGORY_COLUMNS, source, "category")

    probes = []
    for index, row in enumerate(rows):
        prompt = row.get(prompt_key)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ProbeSetError(f"{source}: row {index + 1} has an empty {prompt_key!r}; remove the row or fill it in")
        category = str(row.get(category_key) or "uncategorized") if category_key else "uncategorized"
        probe_id = str(row.get("id") or f"{Path(source).stem}-{index + 1:04d}")
        borderline = _parse_flag(row.get("borderline", False), source, index, "borderline")
        probes.append(Probe(probe_id, prompt.strip(), category, borderline))
    return probes


_TRUE_STRINGS = ("true", "yes", "1")
_FALSE_STRINGS = ("false", "no", "0", "")


def _parse_flag(value: Any, source: str, index: int, column: str) -> bool:
    """Read a boolean cell. CSV cells are strings, so "false" and "0" must not count as true."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, int):
        return value != 0
    text = str(value).strip().lower()
    if text in _TRUE_STRINGS:
        return True
    if text in _FALSE_STRINGS:
        return False
    raise ProbeSetError(f"{source}: row {index + 1} has an invalid {column} value {value!r}; use true or false")


def _parse_csv(text: str, source: str, prompt_column: Optional[str], category_column: Optional[str]) -> list[Probe]:
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as exc:
        raise ProbeSetError(f"{source}: malformed CSV: {exc}") from exc
    return _build_probes(rows, source, prompt_column, category_column)


def _parse_jsonl(text: str, source: str, prompt_column: Optional[str], category_column: Optional[str]) -> list[Probe]:
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProbeSetError(f"{source}:{line_number}: invalid JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise ProbeSetError(f"{source}:{line_number}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return _build_probes(rows, source, prompt_column, category_column)
