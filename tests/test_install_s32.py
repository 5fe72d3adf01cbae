"""constraints.txt: scripts/install.sh and the Dockerfile install every dependency at the version the suite passed
on, so that a new release of one changes nothing on a clean machine until it is pinned (scripts/lock.sh) and
tested."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
# Pinned by install.sh itself (a CUDA host names its own build), so not in constraints.txt.
UNPINNED = {"torch"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9._-]+", name) and re.fullmatch(r"[A-Za-z0-9.+!]+", version), \
            f"constraints.txt: {line!r} is not name==version"
        found[normalized(name)] = version
    return found


def installed_requirements() -> dict[str, str]:
    """Every distribution llava-queue[worker,test] needs, directly or not, with its installed version (torch's own
    dependencies left out: they are torch's build's)."""
    reached: dict[str, str] = {}
    todo = [("llava-queue", frozenset({"worker", "test"}))]
    seen = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = metadata.distribution(name)
        reached[name] = dist.version
        if name in UNPINNED:
            continue
        for text in dist.requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
                todo.append((normalized(requirement.name), frozenset(requirement.extras)))
    return reached


def test_every_dependency_llava_queue_names_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    named = {normalized(Requirement(text).name) for text in project["dependencies"] + extras["worker"] + extras["test"]}
    assert named - UNPINNED - pins().keys() == set()


def test_everything_installed_for_llava_queue_is_at_its_pin():
    # Direct and indirect dependencies: one left unpinned would still move under the suite with a new release.
    pinned = pins()
    reached = installed_requirements()
    unpinned = reached.keys() - pinned.keys() - UNPINNED - {"llava-queue"}
    assert not unpinned, f"not in constraints.txt (run scripts/lock.sh): {sorted(unpinned)}"
    moved = {name: (pinned[name], version) for name, version in reached.items()
             if name in pinned and version != pinned[name]}
    assert not moved, f"installed at other versions than pinned (run scripts/install.sh): {moved}"


def test_the_install_script_and_both_images_install_with_the_pins():
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert re.search(r'^\.venv/bin/pip install .*-c constraints\.txt -e "\.\[worker,test\]"$', install, re.MULTILINE)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("COPY pyproject.toml README.md constraints.txt ./") == 2
    assert re.findall(r"^RUN pip install -c constraints\.txt (\S+)$", dockerfile, re.MULTILINE) == [".", '".[worker]"']
