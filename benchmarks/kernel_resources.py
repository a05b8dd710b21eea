r"""Registers, spills and shared memory of the pallas attention kernels, with no GPU.

A pre-flight check of layers/attention_kernel.py before GPU time: the pallas
core's forward+backward on the window attention of one benchmark model's
stages (attention_core.stage_cases) is lowered for CUDA on any machine,
each Triton kernel's IR is taken from the lowered StableHLO (the `ir`
bytecode of its `__gpu$xla.gpu.triton` custom call, with its num_warps and
num_stages), and pip's `triton` compiles it for a target GPU, through its
whole pipeline (make_ttir's passes included, as XLA runs them) down to ptxas.
Per kernel: ptxas' registers per thread, spill stores and loads and stack
frame, Triton's shared memory, and the wgmma (Hopper tensor-core) instructions
in the PTX (0 where tl.dot became mma.sync, or on other archs).

The figures are those of pip triton's compiler and bundled ptxas (recorded in
the JSON), not necessarily of the Triton and ptxas inside the jaxlib that runs
the kernel on a GPU: a close estimate, not a measurement. Needs a jaxlib that
writes the Triton IR into the lowered module (0.10); later ones compile it
while lowering, and the tool says so.

  python -m benchmarks.kernel_resources --config=swin_t_224 --dtype=bfloat16 \
      --capability=90 --output=kernel_resources.json   # any machine with pip's triton
"""

import contextlib
import functools
import hashlib
import io
import json
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from jaxlib.mlir import ir

from benchmarks import attention_core, throughput
from hierarchical_vit import files

TRITON_CALL = '__gpu$xla.gpu.triton'


def lowered_module(case: dict[str, Any], dtype: str) -> ir.Module:
  """The pallas core's forward+backward (gradients of q, k, v and the bias) on
  one stage_cases case, lowered for CUDA: q, k, v (windows, tokens, heads,
  head_dim) in `dtype`, bias (groups, heads, tokens, tokens) float32."""
  shape = (case['windows'], case['tokens'], case['heads'], case['head_dim'])
  q = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  n = case['tokens']
  bias = jax.ShapeDtypeStruct((case['groups'], case['heads'], n, n), jnp.float32)
  core = attention_core.core_fn('pallas', interpret=False)
  loss = lambda q, k, v, bias: jnp.sum(core(q, k, v, bias).astype(jnp.float32))
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  try:
    lowered = step.trace(q, q, q, bias).lower(lowering_platforms=('cuda',))
  except Exception as error:  # pylint: disable=broad-except
    if 'Triton compilation handler' in str(error):
      raise RuntimeError(
          _compiles_itself(f'lowering failed at its Triton compile: {error}')) from error
    raise
  return lowered.compiler_ir('stablehlo')


def _compiles_itself(found: str) -> str:
  return (f'jax {jax.__version__} compiles the Triton kernels itself while lowering for CUDA '
          f'({found}), so there is no Triton IR to compile here: run this tool with jax/jaxlib '
          f'0.10, which write the IR into {TRITON_CALL} custom calls.')


def triton_kernels(module: ir.Module) -> list[dict[str, Any]]:
  """Each `__gpu$xla.gpu.triton` custom call of a lowered module, in order:
  its kernel name, num_warps, num_stages, grid (x, y, z) and `ir`, the Triton
  IR as MLIR bytecode. Raises RuntimeError where there is none."""
  kernels, targets = [], set()

  def visit(op: ir.Operation) -> ir.WalkResult:
    if op.name == 'stablehlo.custom_call':
      target = ir.StringAttr(op.attributes['call_target_name']).value
      targets.add(target)
      if target == TRITON_CALL:
        config = ir.DictAttr(op.attributes['mhlo.backend_config'])
        number = lambda key: ir.IntegerAttr(config[key]).value
        kernels.append(dict(name=ir.StringAttr(config['name']).value,
                            num_warps=number('num_warps'), num_stages=number('num_stages'),
                            grid=[number(f'grid_{axis}') for axis in 'xyz'],
                            ir=ir.StringAttr(config['ir']).value_bytes))
    return ir.WalkResult.ADVANCE

  module.operation.walk(visit)
  if not kernels:
    raise RuntimeError(_compiles_itself(f'no {TRITON_CALL} custom calls in the lowered module; '
                                        f'custom calls: {sorted(targets) or "none"}'))
  return kernels


def _triton():
  """pip's triton, or a RuntimeError that says how to get it."""
  try:
    import triton  # pylint: disable=import-outside-toplevel
    import triton.compiler  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise RuntimeError('benchmarks.kernel_resources compiles the kernels with pip\'s triton, '
                       f'which does not import here ({error}): pip install triton') from error
  return triton


@functools.cache
def _source_class() -> type:
  """A triton.compile source whose Triton IR is parsed from bytecode. It is an
  ASTSource, not an IRSource file, so that triton starts at make_ttir: an
  IRSource skips the passes of its own stage."""
  triton = _triton()
  from triton._C.libtriton import ir as triton_ir  # pylint: disable=import-outside-toplevel

  class BytecodeSource(triton.compiler.ASTSource):
    """kernel: a triton_kernels entry."""

    def __init__(self, kernel: dict[str, Any]):  # pylint: disable=super-init-not-called
      self.fn, self.name, self.ext = None, kernel['name'], 'ttir'
      self.language = triton.compiler.compiler.Language.TRITON
      self.signature, self.constants, self.attrs = {}, {}, {}
      self.bytecode = kernel['ir']

    def hash(self) -> str:
      return hashlib.sha256(self.bytecode).hexdigest()

    def parse_options(self) -> dict[str, Any]:
      return {}

    def make_ir(self, target, options, codegen_fns, module_map, context):
      del target, options, codegen_fns, module_map
      with tempfile.NamedTemporaryFile(suffix='.mlirbc') as file:  # Triton parses files.
        file.write(self.bytecode)
        file.flush()
        module = triton_ir.parse_mlir_module(file.name, context)
      module.context = context  # As IRSource.make_ir: the passes take it from the module.
      return module

  return BytecodeSource


def _ptxas_info(log: str, name: str) -> dict[str, int]:
  """Registers, spills and stack frame of `name` from ptxas -v's log."""
  entry = log[max(log.find(f"Compiling entry function '{name}'"), 0):]
  frame = re.search(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads',
                    entry)
  registers = re.search(r'Used (\d+) registers', entry)
  if not (frame and registers):
    raise RuntimeError(f'unexpected ptxas log for {name}:\n{log}')
  stack, stores, loads = map(int, frame.groups())
  return dict(registers=int(registers.group(1)), spill_store_bytes=stores, spill_load_bytes=loads,
              stack_bytes=stack)


def compile_kernel(kernel: dict[str, Any], capability: int) -> dict[str, Any]:
  """Compiles a triton_kernels entry for an NVIDIA GPU of `capability` (90:
  sm_90a) with its num_warps and num_stages. Returns ptxas' registers per
  thread, spill store/load and stack bytes, Triton's shared memory bytes, and
  the wgmma instructions of the PTX."""
  triton = _triton()
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  log = io.StringIO()
  # ptxas' -v log is printed only with dump_ptxas_log, and only on a cache miss.
  with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), \
       contextlib.redirect_stdout(log):
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    compiled = triton.compile(_source_class()(kernel),
                              target=GPUTarget('cuda', capability, 32),
                              options=dict(num_warps=kernel['num_warps'],
                                           num_stages=kernel['num_stages']))
  return dict(_ptxas_info(log.getvalue(), compiled.metadata.name),
              shared_bytes=compiled.metadata.shared,
              wgmma=len(re.findall(r'^\s*wgmma\.mma_async', compiled.asm['ptx'], re.MULTILINE)))


def kernel_resources(case: dict[str, Any], dtype: str, capability: int) -> list[dict[str, Any]]:
  """One row per Triton kernel (forward, backward) of the pallas core on a
  stage_cases case: the case, the kernel's launch and compile_kernel's figures."""
  rows = []
  for kernel in triton_kernels(lowered_module(case, dtype)):
    launch = {key: kernel[key] for key in ('name', 'num_warps', 'num_stages', 'grid')}
    rows.append(dict(case, dtype=dtype, kernel=launch.pop('name'), **launch,
                     **compile_kernel(kernel, capability)))
  return rows


def toolchain(capability: int) -> dict[str, str]:
  """Versions of what produced the figures."""
  triton = _triton()
  from triton.backends.nvidia import compiler  # pylint: disable=import-outside-toplevel
  ptxas = compiler.get_ptxas(capability)
  return {'jax': jax.__version__, 'triton': triton.__version__, 'ptxas': ptxas.path,
          'ptxas_version': compiler.get_ptxas_version(capability).strip().splitlines()[-2],
          'arch': compiler.sm_arch_from_capability(capability)}


def format_table(rows: list[dict[str, Any]]) -> str:
  lines = [attention_core.CASE_COLUMNS + ' kernel | grid | warps | stages | registers | '
           'spill stores / loads B | stack B | shared B | wgmma |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"{attention_core.case_cells(r)} {r['kernel']} | "
        f"{' x '.join(map(str, r['grid']))} | {r['num_warps']} | {r['num_stages']} | "
        f"{r['registers']} | {r['spill_store_bytes']} / {r['spill_load_bytes']} | "
        f"{r['stack_bytes']} | {r['shared_bytes']} | {r['wgmma']} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  summary = {'date': time.strftime('%Y-%m-%d %H:%M'), **toolchain(_CAPABILITY.value),
             'config': _CONFIG.value, 'batch': _BATCH.value, 'dtype': _DTYPE.value,
             'capability': _CAPABILITY.value, 'results': []}
  for case in attention_core.stage_cases(_CONFIG.value, _BATCH.value):
    summary['results'] += kernel_resources(case, _DTYPE.value, _CAPABILITY.value)
  if _OUTPUT.value:
    files.write_json(_OUTPUT.value, summary)
  print(json.dumps({k: v for k, v in summary.items() if k != 'results'}))
  print(format_table(summary['results']))


if __name__ == '__main__':
  _CONFIG = flags.DEFINE_enum('config', 'swin_t_224', list(throughput.CONFIGS),
                              'The model whose stages give the shapes.')
  _BATCH = flags.DEFINE_integer('batch', 128, 'Images per step (sets the grids only).',
                               lower_bound=1)
  _DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'], 'q, k, v dtype.')
  _CAPABILITY = flags.DEFINE_integer('capability', 90,
                                     'Target compute capability: 90 is sm_90a (H100), 80 sm_80 '
                                     '(A100), 100 sm_100a.')
  _OUTPUT = flags.DEFINE_string('output', '', 'Write the results here as JSON.')
  app.run(main)
