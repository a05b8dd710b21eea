"""Parameter and FLOP report of a model.

FLOPs come from XLA's cost analysis of the lowered forward pass, so they count
every op of the model (attention, masks, resampling), not a hand formula.

Usage: python -m hierarchical_vit.report --config=configs/fashion_mnist.py
"""

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from hierarchical_vit import cli
from hierarchical_vit.layers.attention import WindowAttention, einsum_attention
from hierarchical_vit.models import build_model, input_shape


def count_params(model: nnx.Module) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def params_by_module(model: nnx.Module) -> dict[str, int]:
  """Parameter count per top-level child module (e.g. encoder, head)."""
  counts: dict[str, int] = {}
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    counts[str(path[0])] = counts.get(str(path[0]), 0) + int(leaf.get_value().size)
  return counts


def forward_flops(model: nnx.Module, input_shape: tuple[int, ...]) -> float:
  """FLOPs of one eval-mode forward pass on an input of `input_shape` (B, H, W, C).

  Counted by XLA:CPU on the lowered (unoptimized) HLO, whatever the default
  backend: a compiled GPU executable hides its cuBLAS and Triton GEMMs from
  XLA's cost analysis (it reported 2.2 of Swin-T's 28.3 GFLOP per training
  image), and the GPU client analyses no lowered HLO.
  """
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
  x = abstract(input_shape, jnp.float32)
  cost = jax.jit(forward).lower(state, x).cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax returns one dict per device.
    cost = cost[0]
  return float(cost.get('flops', 0.0))


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
  model = build_model(m, rngs=nnx.Rngs(0))
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
