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


def available(package):
    """The builds the archive carries, the candidate first, then newest first."""
    policy = apt("apt-cache", "policy", package).stdout
    candidate = re.search(r"^\s*Candidate:\s*(\S+)", policy, re.M)
    builds = []
    if candidate and candidate.group(1) != "(none)":
        builds.append(candidate.group(1))
    for line in apt("apt-cache", "madison", package, check=False).stdout.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) >= 2 and fields[0] == package and fields[1] not in builds:
            builds.append(fields[1])
    return builds


def exact_deps(package, version):
    """The dependencies `package=version` names at one exact version (`name (= X)`)."""
    show = apt("apt-cache", "show", f"{package}={version}").stdout
    record = show.split("\n\n", 1)[0]
    deps = []
    for field in ("Pre-Depends", "Depends"):
        m = re.search(rf"^{field}:(.*(?:\n .*)*)", record, re.M)
        if not m:
            continue
        for dep in m.group(1).replace("\n", " ").split(","):
            exact = re.fullmatch(r"\s*([a-z0-9][a-z0-9+.-]*)(?::\S+)?\s*\(=\s*([^)\s]+)\)\s*", dep)
            if exact:
                deps.append((exact.group(1), exact.group(2)))
    return deps


def plan(packages, pins):
    """`name=build` for each package and the exact dependencies of its build."""
    chosen = {}
    for package in packages:
        if package not in pins:
            raise Refused(f"{package} has no pin in {PINS}; add one before a test installs it")
        pin = pins[package]
        builds = available(package)
        build = next((b for b in builds if matches(b, pin)), None)
        if build is None:
            have = ", ".join(builds) or "none"
            raise Refused(f"the archive has no build of {package} at {describe(pin)} (it has: {have})")
        chosen[package] = build
        todo = [(package, build)]
        while todo:
            for dep, version in exact_deps(*todo.pop()):
                if dep not in chosen:
                    chosen[dep] = version
                    todo.append((dep, version))
    return [f"{name}={build}" for name, build in chosen.items()]


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
            targets = plan(args, pins)
            apt("apt-get", "install", "-y", "-q", "--no-install-recommends", *targets)
            verify(args, pins)
            return 0
        # check: every pin, against lists refreshed now.
        refresh(force=True)
        failures = []
        for package in pins:
            try:
                targets = plan([package], pins)
                apt("apt-get", "install", "-s", "-q", "--no-install-recommends", *targets)
                print(f"debian: {package} {describe(pins[package])}: {' '.join(targets)} installs")
            except Refused as e:
                failures.append(str(e))
        for failure in failures:
            print(f"debian: {failure}", file=sys.stderr)
        return 1 if failures else 0
    except Refused as e:
        print(f"debian: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
