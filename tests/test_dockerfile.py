"""Static checks of the Dockerfile, because no Docker engine runs in the test environment."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as (keyword, arguments), with continuation lines joined."""
    result = []
    logical = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, arguments = logical.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        logical = ""
    return result


def ignored_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE)


def test_base_image_is_slim_python(parsed):
    images = [arguments.split()[0] for keyword, arguments in parsed if keyword == "FROM"]

    assert len(images) == 1
    assert re.fullmatch(r"python:3\.\d+-slim", images[0]), images[0]


def test_copy_sources_exist_and_are_not_ignored(parsed):
    copies = [shlex.split(arguments) for keyword, arguments in parsed if keyword in ("COPY", "ADD")]
    assert copies

    for words in copies:
        paths = [word for word in words if not word.startswith("--")]
        for source in paths[:-1]:
            assert (REPO / source).exists(), f"COPY source {source} is not in the repository"
            for pattern in ignored_patterns():
                assert not fnmatch.fnmatch(source, pattern), f"COPY source {source} is excluded by .dockerignore pattern {pattern}"


def test_entrypoint_is_guardrail_cli(parsed):
    entrypoints = [arguments for keyword, arguments in parsed if keyword == "ENTRYPOINT"]

    assert json.loads(entrypoints[-1]) == ["guardrail"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert "guardrail" in scripts


def test_runs_as_non_root_user(parsed):
    users = [arguments for keyword, arguments in parsed if keyword == "USER"]

    assert users, "the image must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_installs_existing_extras_and_cpu_torch(parsed):
    arguments_by_name = dict(argument.split("=", 1) for keyword, argument in parsed if keyword == "ARG" and "=" in argument)
    runs = " ".join(arguments for keyword, arguments in parsed if keyword == "RUN")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]

    assert arguments_by_name["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "TORCH_VERSION" in arguments_by_name
    installed = re.search(r'\.\[([a-z,]+)\]', runs)
    assert installed is not None
    assert set(installed.group(1).split(",")) == {"gguf", "prefect", "kfp", "mlflow", "plots"}
    assert set(installed.group(1).split(",")) <= set(extras)


def test_has_no_healthcheck(parsed):
    assert "HEALTHCHECK" not in [keyword for keyword, _ in parsed]


def test_image_name_matches_kfp_components():
    pytest.importorskip("kfp")
    from pipelines.kfp.components import GUARDRAIL_IMAGE

    assert GUARDRAIL_IMAGE in DOCKERFILE.read_text(encoding="utf-8")
