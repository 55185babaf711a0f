"""The CI lanes: the main lane's lock covers the stack with exact releases, and the README names what it locks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.testing_utils import ROOT

CI = Path(ROOT, ".ci")
# What the lock must pin: the stack, the extras' packages and the test tools.
LOCKED_AT_LEAST = (
    "torch transformers trl peft accelerate datasets bitsandbytes tokenizers kernels deepspeed pytest pytest-xdist "
    "ruff hypothesis"
).split()


def lock() -> dict[str, str]:
    lines = [line.strip() for line in (CI / "lock.txt").read_text().splitlines()]
    pins = [line for line in lines if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][^\s=]*", pin) for pin in pins), pins  # exact releases, one per line
    return dict(pin.split("==") for pin in pins)


def test_the_lock_pins_the_stack_and_the_test_tools_exactly():
    pins = lock()
    assert set(LOCKED_AT_LEAST) <= set(pins), set(LOCKED_AT_LEAST) - set(pins)
    assert pins["torch"].endswith("+cpu")  # the CPU build on disk, not a CUDA wheel of several GB
    assert "trl-qaloss" not in pins


def test_the_main_lane_installs_the_lock_and_runs_every_test():
    run = (CI / "run").read_text()
    assert 'pip install -q -c .ci/lock.txt -e ".[dev,tracking,bench,sharded]"' in run
    assert "python3 .ci/lock.py check" in run
    assert "RUN_SLOW=1 python3 -m pytest" in run
    newest = (CI / "newest").read_text()
    assert "pip install -q --upgrade --upgrade-strategy eager" in newest and ".ci/lock.py write" in newest


def test_the_readme_names_the_locked_releases():
    readme = Path(ROOT, "README.md").read_text()
    named = re.search(r"the releases locked in `\.ci/lock\.txt` \(tried on [0-9-]+, the newest then: ([^)]*)\)", readme)
    assert named, "README.md: the 'Tested in CI' line does not name the locked releases"
    pins = lock()
    for name, version in re.findall(r"([a-z-]+) ([0-9][0-9.]*)", named[1]):
        assert pins[name].split("+")[0] == version, (name, version, pins[name])


def test_the_lock_script_checks_an_environment_against_the_lock(tmp_path):
    """`lock.py check` fails naming the package whose release differs from the lock."""
    wrong = tmp_path / "lock.txt"
    wrong.write_text("# a lock\ntorch==0.0.1\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import lock; from pathlib import Path; "
        "lock.LOCK = Path(sys.argv[2]); lock.check()"
    )
    result = subprocess.run([sys.executable, "-c", code, str(CI), str(wrong)], capture_output=True, text=True)
    assert result.returncode == 1 and "'torch': ('0.0.1', " in result.stderr, result.stderr
