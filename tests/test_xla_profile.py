"""tools/xla_profile.py: HLO classification on known text, and a real trace of a conv + dot step."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_spec = importlib.util.spec_from_file_location(
    "xla_profile", os.path.join(os.path.dirname(__file__), "..", "tools", "xla_profile.py"))
xp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(xp)

HLO = """HloModule jit_f, is_scheduled=true
%fused_computation (param_0: f32[4,8], param_1: f32[8,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,8]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/transpose(jvp())/dot_general"}
}
%fused_computation.2 (param_0.2: f32[4,8]) -> f32[8,4] {
  %param_0.2 = f32[4,8]{1,0} parameter(0)
  %transpose.1 = f32[8,4]{0,1} transpose(%param_0.2), dimensions={1,0}
  ROOT %copy.1 = f32[8,4]{1,0} copy(%transpose.1)
}
%fused_computation.3 (param_0.3: f32[4,8]) -> f32[4,8] {
  %param_0.3 = f32[4,8]{1,0} parameter(0)
  ROOT %tanh.1 = f32[4,8]{1,0} tanh(%param_0.3), metadata={op_name="jit(f)/jvp()/tanh"}
}
%fused_computation.4 (param_0.4: f32[4,8], param_1.4: f32[8,8]) -> f32[4,8] {
  %param_0.4 = f32[4,8]{1,0} parameter(0)
  %param_1.4 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.4 = f32[4,8]{1,0} dot(%param_0.4, %param_1.4), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/jvp()/dot_general"}
}
ENTRY %main (x: f32[4,8], w: f32[8,8], k: f32[3,3,8,8]) -> f32[4,8] {
  %x = f32[4,8]{1,0} parameter(0), metadata={op_name="x"}
  %w = f32[8,8]{1,0} parameter(1), metadata={op_name="w"}
  %conv.7 = f32[1,4,8,8]{3,2,1,0} convolution(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/jvp()/conv_general_dilated"}
  %ynn_fusion = f32[4,8]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation
  %transpose_copy_fusion = f32[8,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation.2
  %absorbed_fusion = f32[4,8]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation.4, metadata={op_name="jit(f)/transpose(jvp())/add_any"}
  ROOT %loop_fusion = f32[4,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation.3
}
"""


def test_classify_known_hlo():
  instrs = xp.parse_hlo(HLO)
  assert xp.classify("ynn_fusion", instrs) == ("dot", "bwd")           # from the called dot's metadata
  assert xp.classify("absorbed_fusion", instrs) == ("dot", "fwd")       # the dot's pass, not the fusion's name
  assert xp.classify("transpose_copy_fusion", instrs) == ("layout copy", "?")
  assert xp.classify("loop_fusion", instrs) == ("elementwise+reduce", "?")
  assert xp.classify("conv.7", instrs) == ("convolution", "fwd")
  assert xp.classify("not_there", instrs) == ("unknown", "?")
  rows = xp.summarize([("conv.7", 3.0), ("ynn_fusion", 1.0), ("conv.7", 1.0), ("loop_fusion", 5.0)], HLO)
  assert [(r["kind"], r["pass"], r["events"], r["distinct_ops"]) for r in rows] == [
      ("elementwise+reduce", "?", 1, 1), ("convolution", "fwd", 2, 1), ("dot", "bwd", 1, 1)]
  np.testing.assert_allclose([r["share"] for r in rows], [0.5, 0.4, 0.1])


def test_profile_of_a_real_step_attributes_time_to_its_ops(tmp_path):
  """A conv + matmul gradient step: the trace's time must land on its convolution and dots."""
  def f(x, w, k):
    y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.tanh(x.reshape(-1, 512) @ w)) + jnp.sum(y)
  step = jax.jit(jax.grad(f, (1, 2)))
  args = (jnp.ones((2, 8, 8, 512)) * 0.01, jnp.ones((512, 512)) * 0.01, jnp.ones((3, 3, 512, 4)) * 0.01)
  compiled = step.lower(*args).compile()
  # 6 steps, not 2: in the full suite the other worker shares the 2 cores, and one descheduled
  # copy op in a 2-step trace once took 64 % of the time (conv + dot 0.36).
  rows, info = xp.profile_steps(lambda: jax.block_until_ready(compiled(*args)), compiled.as_text(), 6,
                                str(tmp_path / "trace"))
  assert info["steps"] == 6 and info["op_s_per_step"] > 0
  assert abs(sum(r["share"] for r in rows) - 1) < 1e-9
  kinds = {r["kind"] for r in rows}
  assert "unknown" not in kinds, rows                       # every traced op is found in the HLO
  share = lambda kind, pas=None: sum(r["share"] for r in rows if r["kind"] == kind and pas in (None, r["pass"]))
  assert share("dot", "fwd") > 0 and share("dot", "bwd") > 0, rows
  assert share("convolution") + share("dot") > 0.6, rows    # the weight-gradient conv and both matmuls
  assert info["top"] and info["top"][0]["seconds"] >= info["top"][-1]["seconds"]
  md = xp.markdown(rows, info)
  assert md.startswith("| op kind | pass |") and "ms/step" in md
