"""Print the requirements of pyproject.toml, one per line, for a cacheable dependency layer.

Usage: python3 pyproject_deps.py PYPROJECT [EXTRA ...]
With no EXTRA: the project's `dependencies`. With EXTRAs: only those optional-dependency groups (a self-reference
such as `covid-cxr[train]` is expanded). The image installs these before the project itself, so a code change does
not reinstall PyTorch.
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    """Return the requirement strings of the base dependencies, or of the given extras."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    if not extras:
        return list(project.get("dependencies", []))
    name = re.sub(r"[-_.]+", "-", project["name"]).lower()
    groups = project.get("optional-dependencies", {})
    out: list[str] = []
    pending = list(extras)
    seen: set[str] = set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in groups:
            raise SystemExit(f"pyproject_deps: no optional-dependencies group {extra!r} in {pyproject}")
        for req in groups[extra]:
            match = re.match(r"^\s*([A-Za-z0-9._-]+)\s*\[([^\]]*)\]\s*$", req)
            if match and re.sub(r"[-_.]+", "-", match[1]).lower() == name:
                pending.extend(e.strip() for e in match[2].split(",") if e.strip())
            else:
                out.append(req)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
