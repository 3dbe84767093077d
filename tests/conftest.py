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
