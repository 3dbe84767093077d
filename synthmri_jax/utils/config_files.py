"""Config files that build on each other: `sibling(__file__, "quickstart")` is the module
configs/quickstart.py next to the calling config, loaded by path (config files are not a package,
and ml_collections loads them by path too)."""

from __future__ import annotations

import importlib.util
import os
import types


def sibling(config_file: str, name: str) -> types.ModuleType:
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{config_file} builds on {path}, which does not exist")
  spec = importlib.util.spec_from_file_location(f"synthmri_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
