"""Which Python packages IrisSegment needs in Slicer's Python: which are missing, too old or broken, and the pip
arguments that install the others without touching the packages Slicer ships. Needs neither Slicer nor torch:
versions come from the installed packages' metadata; only `check(..., probe=...)` imports a package, to see
that it loads."""
from __future__ import annotations

import importlib
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

TORCH = "torch"  # installed through the PyTorch extension (the build for the user's GPU), never with plain pip
PROTECTED = ("numpy", "scipy", "SimpleITK")  # shipped with Slicer: pinned to the installed version while installing
IMPORT_NAMES = {"PyYAML": "yaml"}  # requirement name -> module name, where they differ


@dataclass(frozen=True)
class Requirement:
    """A package and its minimum version (None: any)."""

    name: str
    minimum: str | None = None

    def __str__(self) -> str:
        return self.name + (f">={self.minimum}" if self.minimum else "")

    @property
    def module(self) -> str:
        return IMPORT_NAMES.get(self.name, self.name)


@dataclass(frozen=True)
class Problem:
    """A requirement that is not met: not installed, too old, or installed but failing to load."""

    requirement: Requirement
    found: str | None = None  # installed version
    error: str = ""  # why it does not load

    @property
    def kind(self) -> str:
        return "missing" if self.found is None else "broken" if self.error else "outdated"

    def text(self) -> str:
        r = self.requirement
        if self.kind == "missing":
            return f"{r.name} is not installed"
        if self.kind == "outdated":
            return f"{r.name} {self.found} is installed, IrisSegment needs {r.name}>={r.minimum}"
        return f"{r.name} {self.found} is installed but does not load ({self.error})"


def parse(lines: str) -> list[Requirement]:
    """Requirements from requirements.txt text: `name` or `name>=version` per line, # comments."""
    out = []
    for line in lines.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]*)\s*(?:>=\s*([0-9][0-9.]*))?", line)
        if match is None:
            raise ValueError(f"requirement {line!r}: only 'name' or 'name>=version' is supported")
        out.append(Requirement(match.group(1), match.group(2)))
    return out


def load(path: str | Path) -> list[Requirement]:
    return parse(Path(path).read_text())


def version_tuple(version: str) -> tuple[int, ...]:
    """The release numbers of a version: "2.1.0+cu121" -> (2, 1, 0), "2.3.0rc1" -> (2, 3, 0)."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(x) for x in match.group(0).split(".")) if match else ()


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check(requirements: list[Requirement], probe: tuple[str, ...] = ()) -> list[Problem]:
    """The unmet requirements, from metadata; those named in `probe` are also imported, to see that they load
    (importing torch takes seconds: probe only where that is acceptable)."""
    problems = []
    for r in requirements:
        found = installed_version(r.name)
        if found is None:
            problems.append(Problem(r))
        elif r.minimum and version_tuple(found) < version_tuple(r.minimum):
            problems.append(Problem(r, found))
        elif r.name in probe:
            try:
                importlib.import_module(r.module)
            except Exception as e:  # a broken install fails in many ways (ImportError, OSError on a DLL, ...)
                problems.append(Problem(r, found, f"{type(e).__name__}: {e}"))
    return problems


def message(problems: list[Problem]) -> str:
    """What the panel and the effect show while something is unmet ("" when all is well)."""
    if not problems:
        return ""
    return ("IrisSegment cannot run yet: " + "; ".join(p.text() for p in problems) + ". Click Install dependencies: "
            "PyTorch comes through the PyTorch extension (it asks first and picks the build for your GPU), the other "
            "packages through pip; the packages Slicer ships are not changed.")


def constraints() -> str:
    """pip constraints pinning the installed packages Slicer ships, so that an install cannot replace them."""
    return "".join(f"{name}=={v}\n" for name in PROTECTED if (v := installed_version(name)) is not None)


def pip_arguments(problems: list[Problem], constraints_file: str | Path) -> list[str]:
    """`pip install` arguments for the unmet requirements other than torch ([] when there are none)."""
    wanted = [str(p.requirement) for p in problems if p.requirement.name != TORCH]
    return ["-c", str(constraints_file), *wanted] if wanted else []


def torch_problem(problems: list[Problem]) -> Problem | None:
    return next((p for p in problems if p.requirement.name == TORCH), None)
