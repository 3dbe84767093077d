"""Config files that build on each other: `sibling(__file__, "quickstart")` is the module
configs/quickstart.py next to the calling config, loaded by path (config files are not a package,
and ml_collections loads them by path too)."""

from __future__ import annotations

import importlib.util
import json
import os
import types
from typing import Any


def sibling(config_file: str, name: str) -> types.ModuleType:
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{config_file} builds on {path}, which does not exist")
  spec = importlib.util.spec_from_file_location(f"synthmri_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def plain(cfg: Any) -> Any:
  """A ConfigDict as plain, key-sorted JSON data (what run keys and fingerprints hash); other values as given."""
  return json.loads(cfg.to_json(sort_keys=True)) if hasattr(cfg, "to_json") else cfg


def load(path: str, overrides=()) -> Any:
  """The config file at `path` with `--config.FIELD=VALUE` overrides, parsed exactly as main.py's
  command line parses them (for tools that take a config the way the main command does). Each call
  parses into its own flag set: ml_collections registers the override flags from the argv it is
  defined with."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["synthmri_jax", f"--config={path}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, sys_argv=argv)
  values(argv)
  return values["config"].value
