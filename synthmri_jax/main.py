"""One entry point: python -m synthmri_jax.main --config configs/<x>.py --workdir DIR.

Every config field can be overridden (`--config.data.spacing_mm=3`). Unknown keys and unknown
stages are errors before any work starts.
"""

from __future__ import annotations

import json
import os
import sys
import time

from synthmri_jax.xla_flags import configure_cpu_flags

configure_cpu_flags()  # must precede anything that imports jax (see xla_flags.py)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from synthmri_jax import stages as stages_lib
from synthmri_jax.workdir import config_hash
from synthmri_jax.utils import io
from synthmri_jax.utils.errors import UserInputError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (Python).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs of this run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (orbax's per-checkpoint lines, XLA backend probing) drown the progress
    # lines; --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  try:
    config = _CONFIG.value
    stages_spec = config.stages
  except (OSError, SyntaxError) as e:        # ml_collections defers a config file's load error to first use
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f"FATAL config error: {'; '.join(lines)}\n{USAGE}")
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    names = stages_lib.parse_stages(stages_spec)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    stages_lib.check_inputs(names, config, workdir)
  except UserInputError as e:
    sys.exit(f"FATAL: {e}")
  import jax  # after the XLA flags are set

  from synthmri_jax.training import distributed
  distributed.initialize(config)
  is_main = jax.process_index() == 0  # one writer of the run's bookkeeping files on multi-host runs
  os.makedirs(workdir, exist_ok=True)
  resolved = json.loads(config.to_json(sort_keys=True))
  if is_main:
    io.write_json_atomic(os.path.join(workdir, "config.json"), {"config": resolved, "config_hash": config_hash(config)})
  print(f"workdir {workdir}, stages {','.join(names)}, config hash {config_hash(config)}", flush=True)
  timings = io.read_json(os.path.join(workdir, "timings.json"), default={})
  for i, name in enumerate(names, 1):
    print(f"[{i}/{len(names)}] stage {name} ...", flush=True)
    t0 = time.time()
    try:
      stages_lib.get_stage(name)(config, workdir)
    except UserInputError as e:  # bad cohort, stale cache, ...: the message is the whole story
      sys.exit(f"FATAL stage {name}: {e}")
    dt = time.time() - t0
    timings[name] = round(dt, 2)
    if is_main:
      io.write_json_atomic(os.path.join(workdir, "timings.json"), timings)
    print(f"[{i}/{len(names)}] stage {name} done in {dt:.1f} s", flush=True)


USAGE = "usage: python -m synthmri_jax.main --config configs/quickstart.py --workdir DIR [--config.a.b=value ...]"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but every misuse (a missing flag, a bad value, an unknown `--config.x.y`, a
  config file that does not load) is one clear line and the usage, not a traceback."""
  path = next((a.split("=", 1)[1] if "=" in a else None for a in argv[1:] if a.split("=")[0] == "--config"), None)
  if path is None and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  if path and not os.path.isfile(path.split(":")[0]):
    sys.exit(f"FATAL config error: {path}: no such config file\n{USAGE}")
  try:
    return flags.FLAGS(argv)
  except SyntaxError as e:                   # in the user's config file: its line is the message
    sys.exit(f"FATAL config error: {e.filename} line {e.lineno}: {e.msg}\n{USAGE}")
  except (KeyError, AttributeError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"FATAL config error: unknown config key {e} (overrides given: {', '.join(overrides) or 'none'}); "
             f"see the config file for the fields that exist\n{USAGE}")
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit("FATAL " + "; ".join(lines) + f"\n{USAGE}")


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  sys.exit(run())
