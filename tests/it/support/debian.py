#!/usr/bin/env python3
"""The Debian packages the tests install: pinned by upstream version, built as Debian has it now.

Usage:
  debian.py check [--pins FILE]   refresh the package lists, then dry-run (apt-get install -s)
                                  every pin; exit 1 naming each package and version that fails
  debian.py install PKG...        install the pinned upstream version of each, refreshing the
                                  lists first when they are older than an hour; print each build
  debian.py installed PKG...      exit 0 when each is installed at its pinned upstream version,
                                  printing the builds; exit 1 otherwise

A pin in the pins file (`debian-pins` beside this script) is `package upstream`, for example
`prometheus 2.42`, which any build of 2.42.x matches (2.42.0+ds-5+b6, 2.42.0+ds-5+deb12u1), or
`package =BUILD` for one exact build. Debian keeps only the newest build of a package in a
suite, so exact builds go stale; upstream pins do not.

The list refresh happens at most once an hour (a stamp under target/tools/), which is at most
once per test run across the test processes; the Rust side serialises installs under a lock.
"""

import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PINS = os.path.join(HERE, "debian-pins")
ROOT = os.path.dirname(os.path.dirname(HERE))
STAMP = os.path.join(ROOT, "target", "tools", "apt-lists.stamp")
FRESH_SECONDS = 3600
ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")


class Refused(Exception):
    """One sentence for the user: which package, what was found, what is wanted."""


def read_pins(path):
    pins = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2:
                raise Refused(f"{path}:{number}: a pin is `package upstream`, not {line!r}")
            pins[fields[0]] = fields[1]
    return pins


def upstream(version):
    """The upstream part of a Debian version: no epoch, no Debian revision."""
    version = version.split(":", 1)[1] if ":" in version else version
    return version.rsplit("-", 1)[0] if "-" in version else version


def matches(version, pin):
    if pin.startswith("="):
        return version == pin[1:]
    up = upstream(version)
    # 2.42 matches 2.42, 2.42.0+ds and 1.19~1's kin, never 2.420.
    return up == pin or (up.startswith(pin) and not up[len(pin)].isdigit())


def describe(pin):
    return f"build {pin[1:]}" if pin.startswith("=") else f"upstream {pin}"


def apt(*args, check=True):
    out = subprocess.run(args, env=ENV, capture_output=True, text=True)
    if check and out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise Refused(f"`{' '.join(args)}` failed: {' / '.join(tail)}")
    return out


def refresh(force):
    fresh = os.path.exists(STAMP) and time.time() - os.path.getmtime(STAMP) < FRESH_SECONDS
    if fresh and not force:
        return
    apt("apt-get", "update", "-q")
    os.makedirs(os.path.dirname(STAMP), exist_ok=True)
    with open(STAMP, "w", encoding="utf-8") as f:
        f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))


def available(packages):
    """For each package, the builds the archive carries: the candidate first, then newest first.
    One `apt-cache policy` and one `apt-cache madison` for them all: each call loads the cache."""
    builds = {p: [] for p in packages}
    policy = apt("apt-cache", "policy", *packages).stdout
    for block in re.split(r"^(?=\S)", policy, flags=re.M):
        name = re.match(r"([a-z0-9][a-z0-9+.-]*):", block)
        candidate = re.search(r"^\s*Candidate:\s*(\S+)", block, re.M)
        if name and name.group(1) in builds and candidate and candidate.group(1) != "(none)":
            builds[name.group(1)].append(candidate.group(1))
    for line in apt("apt-cache", "madison", *packages, check=False).stdout.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) >= 2 and fields[0] in builds and fields[1] not in builds[fields[0]]:
            builds[fields[0]].append(fields[1])
    return builds


def exact_deps(chosen):
    """For each `(package, version)`, the dependencies it names at one exact version."""
    show = apt("apt-cache", "show", *[f"{p}={v}" for p, v in chosen]).stdout
    deps = {}
    for record in show.split("\n\n"):
        name = re.search(r"^Package:\s*(\S+)", record, re.M)
        if not name or name.group(1) in deps:
            continue
        found = []
        for field in ("Pre-Depends", "Depends"):
            m = re.search(rf"^{field}:(.*(?:\n .*)*)", record, re.M)
            if not m:
                continue
            for dep in m.group(1).replace("\n", " ").split(","):
                exact = re.fullmatch(r"\s*([a-z0-9][a-z0-9+.-]*)(?::\S+)?\s*\(=\s*([^)\s]+)\)\s*", dep)
                if exact:
                    found.append((exact.group(1), exact.group(2)))
        deps[name.group(1)] = found
    return deps


def plan(packages, pins):
    """For each package, `name=build` of its pinned build followed by the dependencies that
    build names at one exact version (and theirs). Refused when a package has no such build."""
    for package in packages:
        if package not in pins:
            raise Refused(f"{package} has no pin in {PINS}; add one before a test installs it")
    builds = available(packages)
    targets = {}
    for package in packages:
        pin = pins[package]
        build = next((b for b in builds[package] if matches(b, pin)), None)
        if build is None:
            have = ", ".join(builds[package]) or "none"
            raise Refused(f"the archive has no build of {package} at {describe(pin)} (it has: {have})")
        targets[package] = {package: build}
    # Widen each package's set by the exact dependencies of what it holds, in batches.
    todo = {(p, v) for held in targets.values() for p, v in held.items()}
    seen = {}
    while todo:
        deps = exact_deps(sorted(todo))
        seen.update(deps)
        todo = set()
        for held in targets.values():
            for name in list(held):
                for dep, version in seen.get(name, []):
                    if dep not in held:
                        held[dep] = version
                        if dep not in seen:
                            todo.add((dep, version))
    return {p: [f"{n}={v}" for n, v in held.items()] for p, held in targets.items()}


def installed_build(package):
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status} ${Version}", package], capture_output=True, text=True
    )
    prefix = "install ok installed "
    return out.stdout[len(prefix):].strip() if out.stdout.startswith(prefix) else None


def verify(packages, pins):
    """Fail unless each package is installed at its pin; print the builds."""
    for package in packages:
        build = installed_build(package)
        if build is None:
            raise Refused(f"{package} is not installed; the tests want {describe(pins[package])}")
        if not matches(build, pins[package]):
            raise Refused(
                f"{package} is installed at {build}, and the tests want {describe(pins[package])}"
            )
        print(f"debian: {package} {build} ({describe(pins[package])} pinned)", file=sys.stderr)


def main(argv):
    if len(argv) < 2 or argv[1] not in ("check", "install", "installed"):
        print(__doc__, file=sys.stderr)
        return 2
    command, args = argv[1], argv[2:]
    pins_path = PINS
    if command == "check" and args[:1] == ["--pins"] and len(args) == 2:
        pins_path, args = args[1], []
    try:
        pins = read_pins(pins_path)
        if command == "installed":
            missing = [p for p in args if p not in pins]
            if missing:
                raise Refused(f"{missing[0]} has no pin in {pins_path}")
            if any(installed_build(p) is None or not matches(installed_build(p), pins[p]) for p in args):
                return 1
            verify(args, pins)
            return 0
        if command == "install":
            refresh(force=False)
            targets = sorted({t for ts in plan(args, pins).values() for t in ts})
            apt("apt-get", "install", "-y", "-q", "--no-install-recommends", *targets)
            verify(args, pins)
            return 0
        # check: every pin, against lists refreshed now. One dry run of them all; only when it
        # fails, one per pin, so the failure names its package.
        refresh(force=True)
        failures, planned = [], {}
        try:
            planned = plan(list(pins), pins)
        except Refused:
            # Pin by pin, so that every pin the archive lacks is named, not only the first.
            for package in pins:
                try:
                    planned.update(plan([package], pins))
                except Refused as e:
                    failures.append(str(e))
        everything = sorted({t for targets in planned.values() for t in targets})
        together = apt("apt-get", "install", "-s", "-q", "--no-install-recommends", *everything, check=False)
        for package, targets in planned.items():
            if together.returncode != 0:
                try:
                    apt("apt-get", "install", "-s", "-q", "--no-install-recommends", *targets)
                except Refused as e:
                    failures.append(f"{package} {describe(pins[package])}: {e}")
                    continue
            print(f"debian: {package} {describe(pins[package])}: {' '.join(targets)} installs")
        for failure in failures:
            print(f"debian: {failure}", file=sys.stderr)
        return 1 if failures else 0
    except Refused as e:
        print(f"debian: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
