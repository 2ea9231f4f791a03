"""Is this checkout installed and current? ``python scripts/installed.py [EXTRA...]``

Exit 0 when the ``linepack`` distribution in this Python is an editable install of this
checkout, at the version ``pyproject.toml`` names, and every requirement of its dependencies
and of the given extras is installed at a version the requirement allows; else exit 1 with the
first reason on stderr. ``scripts/setup.sh`` skips pip when it exits 0.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip's own copy: setup.sh runs pip anyway
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def why_not_current(extras: list[str]) -> str | None:
    """What is not current (None: everything is)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    try:
        distribution = importlib.metadata.distribution(project["name"])
    except importlib.metadata.PackageNotFoundError:
        return f"{project['name']} is not installed"
    if distribution.version != project["version"]:
        return f"{project['name']} {distribution.version} is installed, pyproject.toml says {project['version']}"
    origin = json.loads(distribution.read_text("direct_url.json") or "{}")
    if not origin.get("dir_info", {}).get("editable") or origin.get("url") != ROOT.as_uri():
        return f"{project['name']} is installed from {origin.get('url', 'an index')}, not as an editable install of {ROOT}"
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"].get(extra, [])
    for text in requirements:
        requirement = Requirement(text)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return f"{requirement.name} is not installed"
        if not requirement.specifier.contains(version, prereleases=True):
            return f"{requirement.name} {version} does not satisfy {text}"
    return None


if __name__ == "__main__":
    reason = why_not_current([extra for argument in sys.argv[1:] for extra in argument.split(",") if extra])
    if reason is not None:
        print(f"[setup] {reason}: installing", file=sys.stderr)
    sys.exit(0 if reason is None else 1)
