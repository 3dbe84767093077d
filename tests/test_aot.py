"""tools/aot_compile.py: the quickstart's tokenizer and LDM train steps compiled for a TPU v5e:2x2
(libtpu, no TPU) with a (2, 2) data x fsdp mesh. They must fit a chip; each chip must do what one
chip does alone at the per-chip batch (sharding splits the work, it adds none); and the LDM's FLOPs
must match the CPU's cost analysis of the same program.

The TPU compiles run at XLA's lowest optimisation effort (aot.optimization_effort: 3x faster, FLOPs
within 1 %), and the CPU's count is its cost analysis of the lowered program (seconds; within 0.4 % of
its compiled program's, 2026-12-07): a CPU compile of the LDM step alone took 80 s."""

import importlib.util
import os
import sys

import pytest

pytest.importorskip("libtpu", reason="the TPU compiler is the [tpu] extra: pip install -e '.[tpu]'")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
  spec = importlib.util.spec_from_file_location("aot_compile", os.path.join(REPO, "tools", "aot_compile.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def results():
  aot = _tool()
  config = os.path.join(REPO, "configs", "quickstart.py")
  tpu = aot.run(config, "v5e:2x2", ["--config.mesh.data=2", "--config.mesh.fsdp=2"], find=False,
                only="tokenizer,ldm", effort=-1.0)
  # the tokenizer step on one chip at the per-chip batch: what each chip of the (2, 2) mesh should do
  single = aot.run(config, "v5e:2x2", ["--config.tokenizer.batch_size=2"], find=False, only="tokenizer",
                   chips=1, effort=-1.0)["programs"]
  # the LDM step in the TPU's forms (native convolutions), costed by this CPU's XLA
  cpu = aot.run(config, "cpu", [], find=False, only="ldm", forms="tpu", lowered_only=True)
  return aot, tpu, single, cpu


@pytest.mark.slow
def test_steps_compile_for_v5e_and_fit_a_chip(results):
  aot, tpu, _, _ = results
  assert tpu["target"]["chips"] == 4 and tpu["mesh"] == {"data": 2, "fsdp": 2, "spatial": 1, "tensor": 1} and tpu["effort"] == -1.0
  names = [r["program"] for r in tpu["programs"]]
  assert names == ["tokenizer vqvae", "ldm"], names
  for r in tpu["programs"]:
    assert "error" not in r, r
    assert r["fits"] and 0 < r["total_bytes"] < aot.CHIPS["v5e"][0], r
    # the state is donated: the new state reuses the old state's buffers
    assert r["alias_bytes"] > 0.9 * r["output_bytes"], r
    assert r["per_chip_batch"] == r["global_batch"] / 4
    assert r["estimated_seconds"] is not None and r["estimated_seconds"] > 0
  md = aot.markdown(tpu)
  assert "| tokenizer vqvae | 8 (2) |" in md and "| ldm | 8 (2) |" in md   # the quickstart LDM trains at batch 8


@pytest.mark.slow
def test_sharding_splits_the_work_and_adds_none(results):
  """Each chip of the (2, 2) mesh does what one chip does alone at the per-chip batch: no compute
  is replicated over an axis, and the collectives add (almost) no FLOPs. The LDM's total also equals
  the CPU's count of the same program. The tokenizer's does not at 2 per chip: there XLA:TPU rewrites
  the weight-gradient convolutions (a batch of 2 is a small contracting dimension for the MXU) into a
  form that costs more, hence the one-chip reference. Measured on 2026-12-03 (docs/SCALING.md):
  3.63e10 per chip at 2 per chip, 1.102e11 at 8 on one chip, 1.10e11 on this CPU."""
  _, tpu, single, cpu = results
  tok, ldm = tpu["programs"]
  assert single[0]["program"] == "tokenizer vqvae" and single[0]["global_batch"] == tok["per_chip_batch"]
  assert tok["flops_per_chip"] == pytest.approx(single[0]["flops_per_chip"], rel=0.02), (tok, single[0])
  cpu_ldm = cpu["programs"][0]
  assert cpu_ldm["program"] == "ldm" and cpu_ldm["global_batch"] == ldm["global_batch"]
  assert 4 * ldm["flops_per_chip"] == pytest.approx(cpu_ldm["lowered_flops"], rel=0.03), (ldm, cpu_ldm)
