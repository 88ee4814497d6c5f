"""Dependency floors stay above published advisories (requirements/advisories.toml), and the locks pin no
vulnerable release."""

from __future__ import annotations

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO_ROOT


def advisories() -> list[dict[str, str]]:
    return tomllib.loads((REPO_ROOT / "requirements" / "advisories.toml").read_text())["advisory"]


def declared() -> dict[str, Requirement]:
    """Every dependency of pyproject.toml, runtime and extras."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    texts = [
        *project["dependencies"],
        *(d for extra in project["optional-dependencies"].values() for d in extra),
    ]
    requirements = [Requirement(text) for text in texts]
    return {canonicalize_name(r.name): r for r in requirements}


def allows_some(requirement: SpecifierSet, vulnerable: SpecifierSet) -> Version | None:
    """A release both specifiers admit, if any: the floor itself, or a version just inside the vulnerable
    range's upper bound (the ranges here are intervals, the requirements floors)."""
    bounds = [Version(s.version) for s in (*requirement, *vulnerable)]
    candidates = [*bounds, *(Version(f"{b.major}.{b.minor}.{b.micro}.dev0") for b in bounds)]
    candidates += [Version(f"{b}.post1") for b in bounds]
    admitted = [v for v in candidates if v in requirement and vulnerable.contains(v, prereleases=True)]
    return min(admitted) if admitted else None


def test_no_floor_allows_a_release_with_an_advisory():
    requirements = declared()
    offending = []
    for advisory in advisories():
        name = canonicalize_name(advisory["package"])
        assert name in requirements, (
            f"{advisory['package']} ({advisory['id']}) is not a dependency: drop the entry"
        )
        requirement = requirements[name]
        assert any(s.operator == ">=" for s in requirement.specifier), f"{requirement} has no floor"
        release = allows_some(requirement.specifier, SpecifierSet(advisory["vulnerable"]))
        if release is not None:
            offending.append(f"{requirement} allows {release} ({advisory['id']}: {advisory['feature']})")
    assert not offending, "raise these floors in pyproject.toml: " + "; ".join(offending)


def test_the_check_catches_a_floor_inside_a_range():
    assert allows_some(SpecifierSet(">=2.3"), SpecifierSet("<2.6.0")) == Version("2.3")
    assert allows_some(SpecifierSet(">=14"), SpecifierSet(">=0.14.0,<14.0.1")) == Version("14")
    assert allows_some(SpecifierSet(">=4.66"), SpecifierSet(">=4.4.0,<4.66.3")) == Version("4.66")
    assert allows_some(SpecifierSet(">=2.6"), SpecifierSet("<2.6.0")) is None
    assert allows_some(SpecifierSet(">=14.0.1"), SpecifierSet(">=0.14.0,<14.0.1")) is None


def test_the_locks_pin_no_vulnerable_release():
    for lock in ("lock.txt", "lock-dev.txt"):
        pins = {}
        for line in (REPO_ROOT / "requirements" / lock).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, version = line.split("==", 1)
                pins[canonicalize_name(name)] = Version(version.split(";")[0].strip())
        for advisory in advisories():
            pin = pins.get(canonicalize_name(advisory["package"]))
            assert pin is None or pin not in SpecifierSet(advisory["vulnerable"]), (lock, advisory)
