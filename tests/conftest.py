"""The pytest fixtures; the helpers behind them live in `tests/testing_utils.py`."""

from __future__ import annotations

import pytest

from tests.testing_utils import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def seps(tokenizer):
    from trl_qaloss import QASeparators

    return QASeparators.from_tokenizer(tokenizer)
