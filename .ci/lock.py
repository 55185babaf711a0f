"""The main lane's lock, `.ci/lock.txt`: the exact release of every package the main lane installs.

    python .ci/lock.py write   # freeze the running Python's packages into .ci/lock.txt (what .ci/newest does on green)
    python .ci/lock.py check   # fail unless the running Python has exactly the locked releases (what .ci/run does)

`.ci/run` installs with `pip install -c .ci/lock.txt`, so that the same commit gets the same environment, whatever
has been released since. `.ci/newest` tries today's newest releases in a venv of its own and rewrites the lock when
the whole suite passes on them. The project itself and pip's own tools are not locked.
"""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent / "lock.txt"
NOT_LOCKED = {"trl-qaloss", "pip", "setuptools", "wheel"}
# What the lock must cover: the stack, the 4-bit and sharded extras, and the test tools.
REQUIRED = (
    "torch transformers trl peft accelerate datasets bitsandbytes tokenizers kernels deepspeed huggingface-hub "
    "safetensors scipy pytest pytest-xdist ruff hypothesis matplotlib tensorboard"
).split()


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """`{name: version}` of the running Python's distributions, names in their canonical form."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in NOT_LOCKED:
            found[canonical(name)] = dist.version
    return found


def read_lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def write() -> None:
    versions = installed()
    missing = [name for name in REQUIRED if name not in versions]
    if missing:
        sys.exit(f"lock: not installed here, so not locked: {missing}; install the project with all its extras first")
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()
    header = [
        "# The main lane's lock: `.ci/run` installs with `pip install -c .ci/lock.txt`. Do not edit by hand: generated",
        f"# by `.ci/newest` (`python .ci/lock.py write`) on {datetime.date.today()},",
        f"# Python {platform.python_version()}, pip {pip[1] if len(pip) > 1 else '?'}, after the whole suite passed.",
    ]
    LOCK.write_text("\n".join(header + [f"{name}=={versions[name]}" for name in sorted(versions)]) + "\n")
    print(f"wrote {LOCK} ({len(versions)} packages)")


def check() -> None:
    versions, pins = installed(), read_lock()
    wrong = {name: (pin, versions.get(name)) for name, pin in pins.items() if versions.get(name) != pin}
    # A package the lock names but that the main lane does not need (absent here) is fine; a different release is not.
    wrong = {name: v for name, v in wrong.items() if v[1] is not None}
    if wrong:
        sys.exit("main lane: installed releases differ from .ci/lock.txt (name: (locked, installed)): " + str(wrong))
    missing = [name for name in REQUIRED if name not in versions]
    if missing:
        sys.exit(f"main lane: locked packages not installed: {missing}")
    print("main lane on " + ", ".join(f"{n} {versions[n]}" for n in REQUIRED[:10]))


if __name__ == "__main__":
    commands = {"write": write, "check": check}
    if sys.argv[1:2] not in ([c] for c in commands):
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(commands)}}}")
    commands[sys.argv[1]]()
