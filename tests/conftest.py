"""Shared test set-up. Tests run on one CPU device; tests that need several fake devices or
several processes start a subprocess with XLA_FLAGS set before jax is imported."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


@pytest.fixture
def repo_root() -> str:
  return REPO


# The files with the longest compiles, longest first (measured: tokenizer ~6 min, ldm ~4,
# privacy_ldm ~3, tstr ~2, unet ~2 on 2 cores). pytest-xdist (--dist loadfile, pyproject)
# hands whole files to its two workers in collection order; starting these first keeps one
# long file from running alone at the end.
_LONGEST_FIRST = ("test_tokenizer.py", "test_ldm.py", "test_privacy_ldm.py", "test_tstr.py", "test_unet.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
