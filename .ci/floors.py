"""The floors of the floor lane: `name==version` for each dependency `pyproject.toml` bounds from below and CI tests
there (`--check`: fail unless the running Python has exactly those releases installed)."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

TESTED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "tokenizers")


def floors() -> dict[str, str]:
    text = Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)[1]  # [project] dependencies
    found = {}
    for requirement in re.findall(r'"([^"]+)"', dependencies):
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", requirement)
        if match and match[1].lower() in TESTED:
            found[match[1].lower()] = match[2]
    missing = set(TESTED) - set(found)
    if missing:
        sys.exit(f"pyproject.toml declares no lower bound for {sorted(missing)}")
    return found


def release(version: str) -> tuple[int, ...]:
    """`2.13.0+cpu` -> (2, 13), `1.10.1` -> (1, 10, 1): the numeric release without trailing zeros or local labels."""
    parts = [int(p) for p in re.match(r"[0-9.]*[0-9]", version)[0].split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        wrong = {n: (v, metadata.version(n)) for n, v in floors().items() if release(metadata.version(n)) != release(v)}
        if wrong:
            sys.exit(f"floor lane: installed releases differ from the declared floors: {wrong}")
        print("floor lane on " + ", ".join(f"{n} {metadata.version(n)}" for n in floors()))
    else:
        print(" ".join(f"{name}=={version}" for name, version in floors().items()))
