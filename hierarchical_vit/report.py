"""Parameter and FLOP report of a model.

Two FLOP counts, neither a hand formula: forward_flops, XLA's cost analysis of
the lowered forward pass (every op: attention, masks, resampling), which the
report prints; matmul_flops, the matmuls and convolutions of its jaxpr alone,
which model-FLOPs utilization divides (benchmarks/throughput.py).

Usage: python -m hierarchical_vit.report --config=configs/fashion_mnist.py
"""

import math

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from hierarchical_vit import cli
from hierarchical_vit.layers.attention import WindowAttention, einsum_attention
from hierarchical_vit.models import abstract_model, input_shape


def count_params(model: nnx.Module) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def params_by_module(model: nnx.Module) -> dict[str, int]:
  """Parameter count per top-level child module (e.g. encoder, head)."""
  counts: dict[str, int] = {}
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    counts[str(path[0])] = counts.get(str(path[0]), 0) + int(leaf.get_value().size)
  return counts


def _reference_forward(model: nnx.Module, input_shape: tuple[int, ...]):
  """(forward, abstract state, abstract input) of an eval-mode float32 copy of
  model with the einsum attention core, placed on the CPU."""
  model = nnx.clone(model)
  model.eval()  # On the clone: the caller's model keeps its mode.
  for _, module in nnx.iter_graph(model):
    # Fused attention kernels compute what the einsum core does, but a custom
    # call counts 0 FLOPs and cuDNN's does not lower for XLA:CPU.
    if isinstance(module, WindowAttention):
      module.core = einsum_attention
    # In float32: a bfloat16 model's casts count as FLOPs but are not its arithmetic.
    if isinstance(module, nnx.Module) and getattr(module, 'dtype', None) is not None:
      module.dtype = jnp.float32
  graphdef, state = nnx.split(model)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  on_cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  abstract = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on_cpu)
  state = jax.tree.map(lambda a: abstract(a.shape, a.dtype), state)
  return forward, state, abstract(input_shape, jnp.float32)


def forward_flops(model: nnx.Module, input_shape: tuple[int, ...]) -> float:
  """FLOPs of one eval-mode forward pass on an input of `input_shape` (B, H, W, C).

  Counted by XLA:CPU on the lowered (unoptimized) HLO, whatever the default
  backend: a compiled GPU executable hides its cuBLAS and Triton GEMMs from
  XLA's cost analysis (it reported 2.2 of Swin-T's 28.3 GFLOP per training
  image), and the GPU client analyses no lowered HLO.
  """
  forward, state, x = _reference_forward(model, input_shape)
  cost = jax.jit(forward).lower(state, x).cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax returns one dict per device.
    cost = cost[0]
  return float(cost.get('flops', 0.0))


def matmul_flops(model: nnx.Module, input_shape: tuple[int, ...]) -> float:
  """FLOPs of the matmuls and convolutions of one eval-mode forward pass.

  Model FLOPs as model-FLOPs utilization counts them (Chowdhery et al. 2022,
  app. B): elementwise work (GELU, softmax, LayerNorm) is left out, so every
  implementation of one architecture gets the same count, however it computes
  those (forward_flops counts an exact-erf GELU ~4% above a tanh one).
  """
  forward, state, x = _reference_forward(model, input_shape)
  return _jaxpr_matmul_flops(jax.make_jaxpr(forward)(state, x).jaxpr)


def _jaxpr_matmul_flops(jaxpr: jax.extend.core.Jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('while', 'cond'):
      # A while body runs an unknown number of times and a cond one branch:
      # counting each body once would be wrong, silently.
      raise ValueError(f'matmul_flops cannot count a {eqn.primitive.name!r} in the '
                                'forward; use forward_flops')
    if eqn.primitive.name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
    elif eqn.primitive.name == 'conv_general_dilated':
      # Each output element takes one multiply-add per kernel entry feeding it.
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features
    repeats = eqn.params['length'] if eqn.primitive.name == 'scan' else 1
    total += repeats * sum(_jaxpr_matmul_flops(sub) for sub in _sub_jaxprs(eqn.params.values()))
  return total


def _sub_jaxprs(values):
  """The jaxprs among an equation's parameters (pjit, remat, custom_jvp, scan...)."""
  for value in values:
    if isinstance(value, (tuple, list)):
      yield from _sub_jaxprs(value)
    elif hasattr(value, 'eqns'):
      yield value
    elif hasattr(getattr(value, 'jaxpr', None), 'eqns'):
      yield value.jaxpr


def model_report(model: nnx.Module, input_shape: tuple[int, ...]) -> dict:
  """{'params', 'params_by_module', 'gflops_per_image'}; FLOPs of an eval-mode
  forward, whatever mode `model` is in (it stays in it)."""
  return {
      'params': count_params(model),
      'params_by_module': params_by_module(model),
      'gflops_per_image': forward_flops(model, input_shape) / input_shape[0] / 1e9,
  }


def main(argv):
  del argv
  m = flags.FLAGS.config.model
  model = abstract_model(m, check_backend=False)  # Counts alike on any backend.
  report = model_report(model, input_shape(m, flags.FLAGS.batch))
  print(f'params: {report["params"]:,}')
  for name, n in report['params_by_module'].items():
    print(f'  {name}: {n:,}')
  print(f'forward GFLOPs/image: {report["gflops_per_image"]:.4f}')


if __name__ == '__main__':
  # Defined here, not at import: importers (e.g. ablate) have flags of their own.
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
  flags.mark_flag_as_required('config')
  flags.DEFINE_integer('batch', 8, 'Batch size to cost the forward pass at.')
  app.run(main, flags_parser=cli.parse_flags)
