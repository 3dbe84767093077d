"""Where a jitted XLA step spends its time: a jax.profiler trace, grouped by what each op computes.

    from tools.xla_profile import profile_steps
    rows, info = profile_steps(run_one_step, compiled.as_text(), steps=3, trace_dir="prof/")
    print(markdown(rows, info))

or from a shell, for a trace you already have (plus the module's HLO text, `compiled.as_text()`):

    python tools/xla_profile.py TRACE_DIR --hlo step.hlo.txt

The trace records one event per executed HLO instruction (thunk). Each is classified from the
compiled HLO: a fusion by the instructions it calls (a fusion holding a convolution counts as
convolution, then dot, then a transpose/copy-only fusion as a layout copy, else elementwise /
reduction), anything else by its opcode; and as forward or backward from its jax metadata
(`transpose(jvp(...))` is the backward pass; ops XLA created itself, such as a weight-gradient
convolution after a layout rewrite, carry no metadata and show as '?'). Op times are summed over all threads, so on a
multi-threaded CPU their total exceeds the wall time; the shares are what the table is for.
TensorBoard's profile plugin shows the same trace op by op (`tensorboard --logdir TRACE_DIR`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
from typing import Any

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_LAYOUT_OPS = {"parameter", "transpose", "copy", "bitcast", "reshape", "broadcast", "constant", "tuple",
               "get-tuple-element", "slice", "concatenate", "pad", "reverse", "dynamic-slice",
               "dynamic-update-slice"}


def parse_hlo(hlo_text: str) -> dict[str, dict[str, Any]]:
  """instruction name -> {'opcode', 'computation', 'calls', 'op_name'}, for every computation."""
  instrs: dict[str, dict[str, Any]] = {}
  comp = None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m:
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m or comp is None:
      continue
    name, _, opcode, rest = m.groups()
    calls = _CALLS.search(rest)
    op_name = _OPNAME.search(rest)
    instrs[name] = {"opcode": opcode, "computation": comp, "calls": calls.group(1) if calls else None,
                    "op_name": op_name.group(1) if op_name else ""}
  return instrs


def _members(instrs: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """computation -> its instructions, built once per parsed module (classify runs per event)."""
  key = id(instrs)
  if _MEMBERS_CACHE.get("key") != key:
    members: dict[str, list] = collections.defaultdict(list)
    for i in instrs.values():
      members[i["computation"]].append(i)
    _MEMBERS_CACHE.update(key=key, members=dict(members), instrs=instrs)
  return _MEMBERS_CACHE["members"]


_MEMBERS_CACHE: dict[str, Any] = {}


def classify(name: str, instrs: dict[str, dict[str, Any]]) -> tuple[str, str]:
  """(kind, pass) of one executed instruction: kind in convolution / dot / layout copy /
  elementwise+reduce / <opcode>; pass 'fwd', 'bwd' or '?' (no jax metadata)."""
  ins = instrs.get(name)
  if ins is None:
    return "unknown", "?"
  op_names = [ins["op_name"]]
  kind = ins["opcode"]
  if kind == "fusion" and ins["calls"]:
    inner = _members(instrs).get(ins["calls"], [])
    opcodes = {i["opcode"] for i in inner}
    heavy = [i["op_name"] for i in inner if i["opcode"] in ("convolution", "dot") and i["op_name"]]
    if heavy:       # the pass is the heavy op's: a fusion may carry the name of a bwd op it absorbed
      op_names = heavy
    if "convolution" in opcodes:
      kind = "convolution"
    elif "dot" in opcodes:
      kind = "dot"
    elif opcodes <= _LAYOUT_OPS:
      kind = "layout copy"
    else:
      kind = "elementwise+reduce"
  elif kind in ("copy", "transpose"):
    kind = "layout copy"
  named = [n for n in op_names if n]
  if not named:
    return kind, "?"
  return kind, "bwd" if any("transpose(" in n for n in named) else "fwd"


def op_events(trace_dir: str, module: str | None = None) -> list[tuple[str, float]]:
  """(hlo instruction, seconds) for every XLA op event in the newest trace under trace_dir."""
  from jax.profiler import ProfileData
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"{trace_dir}: no *.xplane.pb trace (was jax.profiler.trace given this directory?)")
  events = []
  for plane in ProfileData.from_file(files[-1]).planes:
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        if "hlo_op" not in stats or (module and stats.get("hlo_module") != module):
          continue
        events.append((str(stats["hlo_op"]), ev.duration_ns * 1e-9))
  return events


def summarize(events: list[tuple[str, float]], hlo_text: str) -> list[dict[str, Any]]:
  """Rows (kind, pass, ops, seconds, share), largest first."""
  instrs = parse_hlo(hlo_text)
  total = sum(t for _, t in events) or 1.0
  acc: dict[tuple[str, str], list] = collections.defaultdict(lambda: [set(), 0.0, 0])
  kinds = {name: classify(name, instrs) for name in {n for n, _ in events}}
  for name, t in events:
    row = acc[kinds[name]]
    row[0].add(name)
    row[1] += t
    row[2] += 1
  rows = [{"kind": k, "pass": p, "distinct_ops": len(v[0]), "events": v[2], "seconds": v[1], "share": v[1] / total}
          for (k, p), v in acc.items()]
  return sorted(rows, key=lambda r: -r["seconds"])


def top_ops(events: list[tuple[str, float]], hlo_text: str, n: int = 10) -> list[dict[str, Any]]:
  """The n instructions with the most total time, with their jax op names."""
  instrs = parse_hlo(hlo_text)
  tot: dict[str, float] = collections.defaultdict(float)
  for name, t in events:
    tot[name] += t
  total = sum(tot.values()) or 1.0
  out = []
  for name, t in sorted(tot.items(), key=lambda kv: -kv[1])[:n]:
    kind, pas = classify(name, instrs)
    ins = instrs.get(name, {})
    inner = [i["op_name"] for i in _members(instrs).get(ins.get("calls"), []) if i["op_name"]]
    out.append({"op": name, "kind": kind, "pass": pas, "seconds": t, "share": t / total,
                "jax_op": ins.get("op_name") or (inner[0] if inner else "")})
  return out


def profile_steps(run_step, hlo: str, steps: int, trace_dir: str) -> tuple[list[dict], dict]:
  """Calls `run_step()` (one synchronised step of the compiled module whose HLO text is `hlo`)
  `steps` times under jax.profiler.trace; (summary rows, info)."""
  import time

  import jax
  run_step()  # warm
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      run_step()
  wall = time.perf_counter() - t0
  module = re.match(r"HloModule\s+([\w.\-]+)", hlo)
  events = op_events(trace_dir, module.group(1) if module else None)
  info = {"steps": steps, "wall_s_per_step": wall / steps, "op_s_per_step": sum(t for _, t in events) / steps,
          "top": top_ops(events, hlo)}
  return summarize(events, hlo), info


def markdown(rows: list[dict], info: dict | None = None) -> str:
  lines = ["| op kind | pass | distinct ops | ms/step | share |", "|---|---|---|---|---|"]
  steps = (info or {}).get("steps", 1)
  for r in rows:
    lines.append(f"| {r['kind']} | {r['pass']} | {r['distinct_ops']} | {1e3 * r['seconds'] / steps:.1f} | "
                 f"{100 * r['share']:.1f} % |")
  if info:
    lines.append("")
    lines.append(f"Sum of op times {1e3 * info['op_s_per_step']:.0f} ms/step (all threads), "
                 f"wall {1e3 * info['wall_s_per_step']:.0f} ms/step under the profiler.")
    if info.get("top"):
      lines += ["", "| top op | kind | pass | ms/step | share | jax op |", "|---|---|---|---|---|---|"]
      for t in info["top"]:
        lines.append(f"| `{t['op']}` | {t['kind']} | {t['pass']} | {1e3 * t['seconds'] / steps:.1f} | "
                     f"{100 * t['share']:.1f} % | `{t['jax_op'][-70:]}` |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("trace_dir")
  p.add_argument("--hlo", required=True, help="the compiled module's HLO text (compiled.as_text())")
  p.add_argument("--module", default=None, help="only events of this HLO module")
  p.add_argument("--steps", type=int, default=1, help="steps in the trace (for ms/step)")
  args = p.parse_args(argv)
  with open(args.hlo) as f:
    hlo = f.read()
  events = op_events(args.trace_dir, args.module)
  info = {"steps": args.steps, "op_s_per_step": sum(t for _, t in events) / args.steps,
          "wall_s_per_step": float("nan"), "top": top_ops(events, hlo)}
  print(markdown(summarize(events, hlo), info))


if __name__ == "__main__":
  main()
