#!/usr/bin/env python3
"""Checks the minimum supported Rust version that Cargo.toml states
(`rust-version`) as far as one installed toolchain can, and says what it
did not prove.

Fails when:
- the installed rustc is older than `rust-version` (nothing here builds);
- a crate of the locked dependency graph for this platform (normal, build
  and dev dependencies, transitively) declares a `rust-version` newer than
  ours: the gateway cannot build on our stated version with that lock.

Proves in addition, with clippy (run before this in .ci/run): clippy's
`incompatible_msrv` lint (on by default) reads `rust-version` and refuses
standard-library items stabilised after it in our code.

Does not prove: that the gateway builds with exactly that version when the
installed toolchain is newer (a language feature stabilised later, or a
dependency that understates its own rust-version, would only show there).
Only a build with that toolchain proves it; CI has one toolchain and cannot
download another.
"""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def version(text):
    """(major, minor, patch) of `1.94`, `1.94.0` or `rustc 1.95.0 (...)`."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise SystemExit(f"msrv: no version in {text!r}")
    return tuple(int(g or 0) for g in m.groups())


def shown(v):
    return ".".join(map(str, v))


def main():
    rustc = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    installed = version(re.search(r"^release: (.*)$", rustc, re.M).group(1))
    host = re.search(r"^host: (.*)$", rustc, re.M).group(1)
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    packages = {p["id"]: p for p in meta["packages"]}
    root = meta["resolve"]["root"]
    stated = packages[root].get("rust_version")
    if not stated:
        raise SystemExit("msrv: Cargo.toml states no rust-version")
    ours = version(stated)
    print(f"rust-version {stated}; installed rustc {shown(installed)} ({host})")
    if installed < ours:
        raise SystemExit(f"msrv: the installed rustc {shown(installed)} is older than rust-version {stated}")

    # The crates a build or test of ours compiles on this platform.
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for dep in nodes[pid]["deps"]:
            kinds = {k["kind"] for k in dep["dep_kinds"]}
            # Dev dependencies count for our own tests only, not for a
            # dependency's.
            if pid == root or kinds - {"dev"}:
                todo.append(dep["pkg"])
    seen.discard(root)

    newer, unstated, floor = [], 0, (0, 0, 0)
    for pid in sorted(seen, key=lambda p: packages[p]["name"]):
        p = packages[pid]
        if not p.get("rust_version"):
            unstated += 1
            continue
        theirs = version(p["rust_version"])
        floor = max(floor, theirs)
        if theirs > ours:
            newer.append(f"{p['name']} {p['version']} needs Rust {p['rust_version']}")
    print(
        f"{len(seen)} crates in the locked graph: the newest rust-version any states is {shown(floor)}; "
        f"{unstated} state none"
    )
    if newer:
        print("msrv: these need a newer Rust than rust-version " + stated + ":", file=sys.stderr)
        for line in newer:
            print("  " + line, file=sys.stderr)
        sys.exit(1)
    if installed[:2] == ours[:2]:
        print(f"CI builds with {shown(installed)}: the stated minor version itself")
    else:
        print(
            f"not proven: a build with Rust {stated} itself (CI builds with {shown(installed)}; "
            "no other toolchain can be installed here)"
        )
    print("msrv: OK")


if __name__ == "__main__":
    main()
