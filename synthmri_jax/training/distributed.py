"""Multi-host start-up: one call, before any other jax use, on every process of a run.

    from synthmri_jax.training import distributed
    info = distributed.initialize(config)     # first thing in main(), before jax touches a device

How the process group is found, first match wins:
1. config.distributed.mode == "off" (or env SYNTHMRI_DISTRIBUTED=0): single process, no-op.
2. A coordinator "host:port" in config.distributed.coordinator or env SYNTHMRI_COORDINATOR:
   explicit set-up; num_processes / process_id from the config block, else from
   SYNTHMRI_NUM_PROCESSES / SYNTHMRI_PROCESS_ID (the process id differs per host, so
   launchers pass it through the environment while the config file stays shared).
   num_processes == 1 is a single-process run and stays a no-op.
3. A managed cluster that jax detects itself: a Cloud TPU VM (pods: every worker learns
   its id from the TPU metadata), a SLURM job step with more than one task (srun sets
   SLURM_PROCID etc.; jax then gives each process one local GPU), Open MPI (mpirun), or
   config.distributed.cluster_detection_method (e.g. "mpi4py", "k8s"): jax.distributed.initialize()
   with no arguments.
4. Otherwise a single process: nothing to do, so laptops and CI never wait on a coordinator.

Why not always call jax.distributed.initialize(): without a cluster it needs a coordinator
that does not exist and would block for its timeout; with one process it only adds start-up
time. Why a no-op rather than an error when called twice: tests and notebooks may build
several runs in one interpreter.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import jax

ENV_COORDINATOR = "SYNTHMRI_COORDINATOR"
ENV_NUM_PROCESSES = "SYNTHMRI_NUM_PROCESSES"
ENV_PROCESS_ID = "SYNTHMRI_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "SYNTHMRI_LOCAL_DEVICE_IDS"
ENV_SWITCH = "SYNTHMRI_DISTRIBUTED"
MODES = ("auto", "off")


def default_config():
  """The `config.distributed` block with its defaults (every field optional)."""
  import ml_collections
  d = ml_collections.ConfigDict()
  d.mode = "auto"                    # "auto": explicit coordinator > detected cluster > single process; "off"
  d.coordinator = ""                 # "host:port" of process 0; "": env SYNTHMRI_COORDINATOR, else auto-detect
  d.num_processes = 0                # 0: env SYNTHMRI_NUM_PROCESSES (explicit set-up) or the cluster's count
  d.process_id = -1                  # -1: env SYNTHMRI_PROCESS_ID (explicit set-up) or the cluster's id
  d.local_device_ids = ""            # e.g. "0,1": devices this process owns; "": jax's default
  d.cluster_detection_method = ""    # force one of jax's detectors, e.g. "mpi4py", "k8s"
  d.initialization_timeout = 300     # seconds to wait for every process to join
  return d


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` will do: method in {'single', 'explicit', 'slurm', 'tpu', 'ompi', 'forced', 'already'}."""

  method: str
  kwargs: dict


@dataclasses.dataclass(frozen=True)
class Info:
  method: str
  process_index: int
  process_count: int
  local_devices: int
  global_devices: int

  def __str__(self) -> str:
    return (f"process {self.process_index}/{self.process_count} ({self.method}), "
            f"{self.local_devices} local / {self.global_devices} global devices")


def _block(config: Any) -> Mapping[str, Any]:
  """config.distributed merged over the defaults; unknown keys are an error (a typo must not go single-process)."""
  out = dict(default_config())
  block = None
  if config is not None:
    block = config.get("distributed", None) if hasattr(config, "get") else getattr(config, "distributed", None)
  if block is not None:
    items = dict(block.items()) if hasattr(block, "items") else dict(vars(block))
    unknown = sorted(set(items) - set(out))
    if unknown:
      raise ValueError(f"unknown config.distributed fields {unknown}; known: {sorted(out)}")
    out.update(items)
  if out["mode"] not in MODES:
    raise ValueError(f"config.distributed.mode must be one of {MODES}, got {out['mode']!r}")
  return out


def _int(value: Any, name: str) -> int:
  try:
    return int(str(value).strip())
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _device_ids(value: Any) -> Optional[list[int]]:
  if value is None or value == "" or (isinstance(value, Sequence) and not isinstance(value, str) and not value):
    return None
  if isinstance(value, str):
    return [_int(v, "local_device_ids") for v in value.split(",") if v.strip()]
  if isinstance(value, int):
    return [value]
  return [_int(v, "local_device_ids") for v in value]


def _on_cloud_tpu_vm() -> bool:
  try:
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    return bool(running_in_cloud_tpu_vm)
  except Exception:  # private module moved: fall back to the TPU runtime's own variables
    return any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID"))


def detect_cluster(env: Mapping[str, str]) -> Optional[str]:
  """'slurm' / 'ompi' / 'tpu' when this process is one of several that jax can wire up itself."""
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm) and _int(env["SLURM_NTASKS"], "SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and _int(env.get("OMPI_COMM_WORLD_SIZE", "2"), "OMPI_COMM_WORLD_SIZE") > 1:
    return "ompi"
  if _on_cloud_tpu_vm():
    return "tpu"
  return None


def plan(config: Any = None, env: Optional[Mapping[str, str]] = None) -> Plan:
  """Decides how to start (see the module docstring) without touching jax; pure, so it is unit-testable."""
  env = os.environ if env is None else env
  cfg = _block(config)
  timeout = _int(cfg["initialization_timeout"], "distributed.initialization_timeout")
  if cfg["mode"] == "off" or env.get(ENV_SWITCH, "").strip().lower() in ("0", "off", "false", "no"):
    return Plan("single", {})

  coordinator = str(cfg["coordinator"] or env.get(ENV_COORDINATOR, "")).strip()
  num = _int(cfg["num_processes"], "distributed.num_processes") or _int(env.get(ENV_NUM_PROCESSES, "0") or 0,
                                                                        ENV_NUM_PROCESSES)
  pid = _int(cfg["process_id"], "distributed.process_id")
  if pid < 0:
    pid = _int(env.get(ENV_PROCESS_ID, "-1") or -1, ENV_PROCESS_ID)
  devices = _device_ids(cfg["local_device_ids"]) or _device_ids(env.get(ENV_LOCAL_DEVICE_IDS, ""))

  if coordinator:
    if ":" not in coordinator:
      raise ValueError(f"distributed coordinator must be 'host:port', got {coordinator!r}")
    if num < 1:
      raise ValueError(f"a coordinator ({coordinator}) is set but not the number of processes: set "
                       f"config.distributed.num_processes or {ENV_NUM_PROCESSES}")
    if num == 1:
      return Plan("single", {})
    if not 0 <= pid < num:
      raise ValueError(f"process id {pid} is not in [0, {num}): set config.distributed.process_id or "
                       f"{ENV_PROCESS_ID} on every process")
    kwargs = dict(coordinator_address=coordinator, num_processes=num, process_id=pid,
                  initialization_timeout=timeout)
    if devices is not None:
      kwargs["local_device_ids"] = devices
    return Plan("explicit", kwargs)

  kwargs = dict(initialization_timeout=timeout)
  if devices is not None:
    kwargs["local_device_ids"] = devices
  if cfg["cluster_detection_method"]:
    return Plan("forced", dict(kwargs, cluster_detection_method=str(cfg["cluster_detection_method"])))
  cluster = detect_cluster(env)
  if cluster is not None:
    return Plan(cluster, kwargs)
  return Plan("single", {})


def is_initialized() -> bool:
  from jax._src import distributed as _dist
  return _dist.global_state.client is not None


def initialize(config: Any = None, env: Optional[Mapping[str, str]] = None) -> Info:
  """Joins the process group this process belongs to (no-op for a single process); returns who we are.

  Must run before any jax computation or device query on every process of the run.
  """
  p = Plan("already", {}) if is_initialized() else plan(config, env)
  if p.method not in ("single", "already"):
    try:
      jax.distributed.initialize(**p.kwargs)
    except RuntimeError as e:
      where = p.kwargs.get("coordinator_address", p.method)
      raise RuntimeError(f"jax.distributed.initialize failed ({where}): {e}. Every process of the run must "
                         "start within distributed.initialization_timeout seconds, reach the coordinator's "
                         "port, and call this before any other jax use.") from e
  return Info(method=p.method, process_index=jax.process_index(), process_count=jax.process_count(),
              local_devices=jax.local_device_count(), global_devices=jax.device_count())


def shutdown() -> None:
  """Leaves the process group (lets the coordinator exit cleanly at the end of a run); no-op otherwise."""
  if is_initialized():
    jax.distributed.shutdown()
