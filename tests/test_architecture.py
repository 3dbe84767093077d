"""The dependency rules of docs/ARCHITECTURE.md, checked on the source: models import nothing from
training (or the stages), sharding.py nothing from the project, each layer only the layers below
it, no import cycle, every stage in pipeline/, and no module reaches into another module's
private names."""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "synthmri_jax")


def _imports(path):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      yield node.module, [a.name for a in node.names]
    elif isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, []


def _py(folder):
  for d, _, files in os.walk(folder):
    for f in files:
      if f.endswith(".py"):
        yield os.path.join(d, f)


def test_models_import_only_models_and_sharding():
  bad = []
  for path in _py(os.path.join(PKG, "models")):
    for mod, names in _imports(path):
      if mod.startswith("synthmri_jax") and not (mod.startswith("synthmri_jax.models") or mod == "synthmri_jax.sharding"
                                                 or (mod == "synthmri_jax" and set(names) <= {"sharding"})
                                                 or (mod == "synthmri_jax.utils" and set(names) <= {"backend"})):
        bad.append(f"{os.path.relpath(path, REPO)}: {mod} {names}")
  assert not bad, bad


def test_sharding_imports_nothing_from_the_project():
  assert not [m for m, _ in _imports(os.path.join(PKG, "sharding.py")) if m.startswith("synthmri_jax")]


def _module(path):
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _package_imports(path, top_level_only):
  """The synthmri_jax modules `path` imports (a `from pkg import module` counts as that module)."""
  tree = ast.parse(open(path).read())
  known = {_module(p) for p in _py(PKG)}
  out = set()
  for node in (tree.body if top_level_only else ast.walk(tree)):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("synthmri_jax"):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        out.add(full if full in known else node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("synthmri_jax"))
  return out


# What each layer may import (besides itself, utils, workdir and sharding); lazy imports included.
ALLOWED = {
    "data": set(),
    "models": set(),
    "diffusion": set(),
    "training": {"data"},
    "latents": {"data"},
    "tasks": {"data", "models", "diffusion", "latents", "training"},
    "config_blocks": {"training"},
}


def test_each_layer_imports_only_the_layers_below_it():
  free = {"utils", "workdir", "sharding"}
  bad = []
  for path in _py(PKG):
    mod = _module(path).split(".")
    layer = mod[1] if len(mod) > 1 else ""
    if layer not in ALLOWED:
      continue
    for target in _package_imports(path, top_level_only=False):
      t = target.split(".")
      dep = t[1] if len(t) > 1 else ""
      if dep and dep != layer and dep not in free and dep not in ALLOWED[layer]:
        bad.append(f"{os.path.relpath(path, REPO)} imports {target}")
  assert not bad, bad


def test_no_import_cycle():
  graph = {_module(p): {m for m in _package_imports(p, top_level_only=True)} for p in _py(PKG)}
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if nxt == node or nxt not in graph:
        continue
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, cycles


def test_every_stage_is_a_pipeline_module_with_run():
  from synthmri_jax import stages
  assert list(stages.STAGES) == list(stages.STAGE_ORDER)
  for name, target in stages.STAGES.items():
    module, fn = target.split(":")
    assert (module, fn) == (f"synthmri_jax.pipeline.{name}", "run"), target
    path = os.path.join(PKG, "pipeline", name, "__init__.py") if name == "report" else \
        os.path.join(PKG, "pipeline", f"{name}.py")
    assert re.search(r"^def run\(config, workdir", open(path).read(), re.M), path


def test_no_module_uses_another_modules_private_names():
  bad = []
  pattern = re.compile(r"\b([a-z_]+_lib|[a-z_]+_stage|ldm|prepare|trainer|tstr|privacy|sampling|cohort|loader|nifti|embedded|ingest|latents|generator|attributes|dp_sgd|train_step|summaries|copies|membership|epsilon|report|tokenizer|tokenizer_blocks|mni_template|rois)\._[a-z]\w*")
  for folder in (PKG, os.path.join(REPO, "tools")):
    for path in _py(folder):
      for i, line in enumerate(open(path), 1):
        m = pattern.search(line)
        if m and not line.lstrip().startswith("#"):
          bad.append(f"{os.path.relpath(path, REPO)}:{i}: {m.group(0)}")
  assert not bad, bad


MAX_MODULE_LINES = 500      # ratchets: lower them as files split, never raise them
MAX_FUNCTION_LINES = 106


def test_no_module_or_function_outgrows_the_ratchet():
  """One idea per file: a module past MAX_MODULE_LINES, or a function past MAX_FUNCTION_LINES,
  holds more than one and should be split (docs/ARCHITECTURE.md)."""
  long_modules, long_functions = [], []
  for path in _py(PKG):
    src = open(path).read()
    rel = os.path.relpath(path, REPO)
    if src.count("\n") > MAX_MODULE_LINES:
      long_modules.append((rel, src.count("\n")))
    for node in ast.walk(ast.parse(src)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
          node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
        long_functions.append((rel, node.name, node.end_lineno - node.lineno + 1))
  assert not long_modules, long_modules
  assert not long_functions, long_functions
