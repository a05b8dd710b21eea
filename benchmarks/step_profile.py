r"""Where a train (or eval) step's time goes, op by op (XLA:CPU or a GPU).

Traces a few steps of `benchmarks.throughput`'s jitted step with jax.profiler,
maps each executed op (XLA:CPU runs one thunk per fusion) back to the compiled
HLO, and prints:

  - matmuls grouped by shape: time per step, GFLOP, achieved GFLOP/s;
  - fused attention kernels (`model.attention='pallas'`'s pallas_call, and any
    op named like a fused attention: fmha, flash), whose dots the HLO hides;
  - every other op grouped by fusion kind (LayerNorm, GELU, transposes, ...).

Op times are summed over the threads that ran them, so their total can exceed
the step's wall time when XLA:CPU runs independent ops side by side.

  python -m benchmarks.step_profile --config=swin_t_32 --mode=train
  python -m benchmarks.step_profile --config=swin_t_224 --gelu=erf --dtype=bfloat16 \
      --trace_out=/tmp/swin_t_224   # on a GPU: kernels per HLO op
"""

import collections
import glob
# pylint: disable=wrong-import-position
from hierarchical_vit import tcmalloc

if __name__ == '__main__':
  # Before the heavy imports, which the re-executed process repeats: timed
  # under the allocator that train.py and eval.py run with.
  tcmalloc.reexec_with_tcmalloc()

import gzip
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
from absl import app, flags, logging

from benchmarks import throughput
from hierarchical_vit import files
from hierarchical_vit.layers.attention import ATTENTION_CORES

_DEF = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]')
_DOT = re.compile(r'= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)')
_CALLS = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?calls=%([\w.\-]+)')
# A GEMM that XLA:GPU hands to cuBLAS: (out, workspace) = custom-call(lhs, rhs).
# Operands past lhs and rhs (a bias, fp8 scales) are the epilogue's.
_CUBLAS = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = \(\w+\[([\d,]*)\]\S*, .*?custom-call\('
                     r'%([\w.\-]+), %([\w.\-]+)(?:, %[\w.\-]+)*\), '
                     r'custom_call_target="__cublas.*?"lhs_contracting_dimensions":\[([\d",]*)\]')
# Profiler bookkeeping around the ops themselves.
_NOT_OPS = ('ThunkExecutor', 'SlinkyThreadPool', 'PjitFunction', 'ThreadpoolListener', '$',
            'end: ', 'CommonPjRt', 'Handle ', 'ParseArguments', 'AllocateOutput')


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(',') if d]


def _product(line: str, shapes: dict[str, list[int]]) -> tuple[str, float, str] | None:
  """(op name, FLOPs, 'lhs x rhs -> out') of an HLO line that is a dot or a cuBLAS
  GEMM, given the shapes of its computation's values; None for any other line."""
  gemm = _CUBLAS.match(line)
  if gemm:
    op, out, lhs, rhs, contracting = gemm.groups()
    out, axes = _dims(out), [int(d) for d in re.findall(r'\d+', contracting)]
  else:
    dot = _DOT.search(line)
    if not dot:
      return None
    op = _DEF.match(line).group(1)
    out, lhs, rhs, rest = _dims(dot.group(1)), dot.group(2), dot.group(3), dot.group(4)
    contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest)
    axes = _dims(contracting.group(1)) if contracting else []
  k = math.prod(shapes[lhs][d] for d in axes)
  return op, 2.0 * math.prod(out) * k, f'{shapes[lhs]} x {shapes[rhs]} -> {out}'


def hlo_dots(hlo_text: str) -> dict[str, tuple[float, str]]:
  """{op name: (matmul FLOPs, 'lhs x rhs -> out' shapes)} of a compiled HLO module.

  An op is a dot itself, a fusion whose called computation holds dots (XLA:CPU's
  and XLA:GPU's Triton GEMMs), or a cuBLAS custom call (XLA:GPU).
  """
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if line and not line.startswith((' ', '}')) and line.rstrip().endswith('{'):
      current = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      computations[current] = []
    elif current is not None and line.startswith(' '):
      computations[current].append(line)

  dots_in: dict[str, tuple[float, list[str]]] = {}
  own_dots: dict[str, tuple[str, tuple[float, str]]] = {}
  for name, lines in computations.items():
    shapes = {m.group(1): _dims(m.group(3)) for m in map(_DEF.match, lines) if m}
    flops, descriptions = 0.0, []
    for line in lines:
      product = _product(line, shapes)
      if product:
        op, op_flops, description = product
        flops += op_flops
        descriptions.append(description)
        own_dots[op] = (name, (op_flops, description))
    dots_in[name] = (flops, descriptions)

  result, called = {}, set()
  for lines in computations.values():
    for call in map(_CALLS.match, lines):
      if call:
        called.add(call.group(2))
        if dots_in.get(call.group(2), (0.0,))[0]:
          flops, descriptions = dots_in[call.group(2)]
          result[call.group(1)] = (flops, ' + '.join(descriptions))
  # Dots inside a called computation run as part of their caller's op.
  result.update({name: dot for name, (computation, dot) in own_dots.items()
                 if computation not in called})
  return result


def _named(events: list[dict[str, Any]], kind: str) -> dict[Any, str]:
  """{pid or (pid, tid): name} from a trace's 'process_name' or 'thread_name' metadata."""
  key = ((lambda e: e.get('pid')) if kind == 'process_name'
         else (lambda e: (e.get('pid'), e.get('tid'))))
  return {key(e): e.get('args', {}).get('name', '') for e in events
          if e.get('ph') == 'M' and e.get('name') == kind}


def op_times(trace_events: list[dict[str, Any]], steps: int) -> dict[str, float]:
  """{op name: seconds per step} from a perfetto trace's complete ('X') events.

  On a GPU ops are the kernels on the device's streams, named by the HLO op
  that launched them (several kernels of one op add up); on a device without
  streams (a TPU), its 'XLA Ops' line. The host's events and the device's other
  lines (modules, steps, name scopes) repeat those ops and are left out. On
  XLA:CPU ops are the host threads' thunks.
  """
  devices = {pid for pid, name in _named(trace_events, 'process_name').items()
             if name.startswith('/device:')}
  threads = {key: name for key, name in _named(trace_events, 'thread_name').items()
             if key[0] in devices}
  lines = ({key for key, name in threads.items() if name.startswith('Stream')}
           or {key for key, name in threads.items() if name == 'XLA Ops'})
  if devices and not lines:
    raise ValueError('the trace has a device but neither streams nor an XLA Ops line: '
                     f'its lines are {sorted(set(threads.values()))}')
  times: dict[str, float] = collections.Counter()
  for event in trace_events:
    if event.get('ph') != 'X':
      continue
    if devices:
      if (event.get('pid'), event.get('tid')) not in lines:
        continue
      name = event.get('args', {}).get('hlo_op', event['name'])
    elif event['name'].startswith(_NOT_OPS):
      continue
    else:
      name = event['name']
    times[name] += event.get('dur', 0) * 1e-6 / steps
  return dict(times)


# XLA ops that are whole attention cores: our Pallas kernel (its dots are
# inside the custom call, so hlo_dots cannot count them) and fused attention
# (cuDNN's, as `model.attention='cudnn'` runs it, is dot_product_attention_fwd/bwd
# in an H100 trace of 2026-11-27).
_XLA_ATTENTION = re.compile(r'pallas_call|dot_product_attention|fmha|flash', re.IGNORECASE)


def summarize(times: dict[str, float], dots: dict[str, tuple[float, str]]) -> dict[str, Any]:
  """Matmuls grouped by shape, fused attention kernels, and the other ops
  grouped by fusion kind."""
  by_shape: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
  by_kind: dict[str, float] = collections.Counter()
  for name, seconds in times.items():
    if name in dots:
      flops, description = dots[name]
      group = by_shape[description]
      group[0] += seconds
      group[1] += flops
      group[2] += 1
    else:
      by_kind[re.sub(r'\.\d+$', '', name)] += seconds
  matmuls = sorted(({'shapes': k, 's': v[0], 'gflop': v[1] / 1e9, 'count': v[2],
                     'gflop_s': v[1] / v[0] / 1e9 if v[0] else 0.0}
                    for k, v in by_shape.items()), key=lambda r: -r['s'])
  attention_s = sum(v for k, v in by_kind.items() if _XLA_ATTENTION.search(k))
  others = sorted(({'kind': k, 's': v} for k, v in by_kind.items()
                   if not _XLA_ATTENTION.search(k)), key=lambda r: -r['s'])
  matmul_s = sum(r['s'] for r in matmuls)
  matmul_gflop = sum(r['gflop'] for r in matmuls)
  return {'matmul_s': matmul_s, 'matmul_gflop': matmul_gflop,
          'matmul_gflop_s': matmul_gflop / matmul_s if matmul_s else 0.0,
          'attention_s': attention_s, 'other_s': sum(r['s'] for r in others),
          'matmuls': matmuls, 'others': others}


def profile(name: str, mode: str, gelu: str, batch: int, steps: int, dtype: str = 'float32',
            attention: str = 'einsum', trace_out: str = '') -> dict[str, Any]:
  """Traces `steps` steps of the benchmark config `name` and summarizes them.

  trace_out: a folder to keep the perfetto trace and the compiled HLO in, for
  reading again offline (an accelerator is lent for minutes).
  """
  config = throughput.model_config(throughput.CONFIGS[name], gelu_approximate=gelu == 'tanh',
                                   dtype=dtype, attention=attention)
  ours = throughput.Ours(config, batch, modes=(mode,))
  run = ours.train if mode == 'train' else ours.eval
  compiled = ours.train_step if mode == 'train' else ours.eval_step
  run(2)  # Warm-up.
  wall = run(steps) / steps
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      run(steps)
    (trace_file,) = glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True)
    with gzip.open(trace_file) as f:
      events = json.load(f)['traceEvents']
    if trace_out:
      os.makedirs(trace_out, exist_ok=True)
      shutil.copy(trace_file, os.path.join(trace_out, 'perfetto_trace.json.gz'))
      with gzip.open(os.path.join(trace_out, 'hlo.txt.gz'), 'wt') as f:
        f.write(compiled.as_text())
  times = op_times(events, steps)
  if any(op.startswith('command_buffer') for op in times):
    logging.warning('XLA:GPU ran the step as CUDA graphs (command_buffer ops), which hide '
                    'its kernels: profile with XLA_FLAGS=--xla_gpu_enable_command_buffer=')
  summary = summarize(times, hlo_dots(compiled.as_text()))
  return {'config': name, 'mode': mode, 'gelu': gelu, 'dtype': dtype, 'attention': attention,
          'batch': batch, 'steps': steps, 'step_s': wall, 'backend': jax.default_backend(),
          'devices': [str(d) for d in jax.devices()], 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'date': time.strftime('%Y-%m-%d %H:%M'), **summary}


# Kernel (GPU) or op (CPU) names in torch's profiles: fused attention kernels
# (their softmax included), then matrix products: cuBLAS's and CUTLASS's
# kernels, and the aten ops that call them on the CPU.
_TORCH_ATTENTION = re.compile(r'fmha|flash|attention', re.IGNORECASE)
_TORCH_GEMM = re.compile(r'gemm|nvjet|cutlass|xmma|cublas|aten::(addmm|mm|bmm|baddbmm)$')


def torch_op_times(run: Callable[[int], float], torch: ModuleType,
                   steps: int) -> dict[str, float]:
  """{name: seconds per step} of `run(steps)` under torch's profiler: the GPU's
  kernels where torch runs on one, else the CPU ops' self times."""
  cuda = torch.cuda.is_available()
  activities = [torch.profiler.ProfilerActivity.CPU]
  if cuda:
    activities.append(torch.profiler.ProfilerActivity.CUDA)
  with torch.profiler.profile(activities=activities) as prof:
    run(steps)
  times = {}
  for event in prof.key_averages():
    if cuda and event.device_type != torch.autograd.DeviceType.CUDA:
      continue  # A CPU op's device time repeats its kernels'.
    us = event.self_device_time_total if cuda else event.self_cpu_time_total
    if us > 0:
      times[event.key] = us * 1e-6 / steps
  return times


def summarize_torch(times: dict[str, float], rows: int = 40) -> dict[str, Any]:
  """Fused attention, matrix products, the rest, and the costliest kernels."""
  attention_s = sum(s for name, s in times.items() if _TORCH_ATTENTION.search(name))
  gemm_s = sum(s for name, s in times.items()
               if _TORCH_GEMM.search(name) and not _TORCH_ATTENTION.search(name))
  top = sorted(times.items(), key=lambda item: -item[1])[:rows]
  return {'attention_s': attention_s, 'gemm_s': gemm_s,
          'other_s': sum(times.values()) - gemm_s - attention_s,
          'top': [{'name': name, 's': s} for name, s in top]}


def profile_timm(name: str, mode: str, batch: int, steps: int, dtype: str = 'float32',
                 compile_model: bool = False) -> dict[str, Any]:
  """The same model's step in timm (`throughput.Timm`, whose GELU is always
  exact), traced by torch's profiler."""
  timm_model = throughput.timm_for(name, dtype, batch, compile_model)
  run = timm_model.train if mode == 'train' else timm_model.eval
  run(2)  # Warm-up (and torch.compile's compilation).
  wall = run(steps) / steps
  times = torch_op_times(run, timm_model.torch, steps)
  return {'config': name, 'mode': mode, 'batch': batch, 'steps': steps, 'dtype': dtype,
          'timm_compile': compile_model, 'step_s': wall, **summarize_torch(times)}


def format_summary(result: dict[str, Any], rows: int) -> str:
  """Markdown tables of `profile`'s result, `rows` rows each."""
  ops_s = result['matmul_s'] + result['attention_s'] + result['other_s']
  lines = [f"{result['config']} {result['mode']} step, batch {result['batch']}: "
           f"{result['step_s'] * 1e3:.0f} ms wall; ops {ops_s * 1e3:.0f} ms "
           f"= matmuls {result['matmul_s'] * 1e3:.0f} ms ({result['matmul_gflop']:.1f} GFLOP at "
           f"{result['matmul_gflop_s']:.0f} GFLOP/s) + fused attention "
           f"{result['attention_s'] * 1e3:.1f} ms + other {result['other_s'] * 1e3:.0f} ms",
           '', '| matmul (lhs x rhs -> out) | count | ms/step | GFLOP | GFLOP/s |', '|---|---|---|---|---|']
  lines += [f"| {r['shapes']} | {r['count']} | {r['s'] * 1e3:.1f} | {r['gflop']:.2f} | {r['gflop_s']:.0f} |"
            for r in result['matmuls'][:rows]]
  lines += ['', '| other op kind | ms/step |', '|---|---|']
  lines += [f"| {r['kind']} | {r['s'] * 1e3:.1f} |" for r in result['others'][:rows]]
  return '\n'.join(lines)


def main(argv):
  del argv
  if _TIMM.value:
    throughput.leave_gpu_memory_to_torch()
  result = profile(_CONFIG.value, _MODE.value, _GELU.value, _BATCH.value, _STEPS.value,
                   _DTYPE.value, _ATTENTION.value, _TRACE_OUT.value)
  print(format_summary(result, _ROWS.value))
  if _OUTPUT.value:
    # Before timm's profile: should it fail, ours is kept (gpu_check.sh then
    # does not fall back to another attention core).
    files.write_json(_OUTPUT.value, result)
  if _TIMM.value:
    result['timm_setup'] = throughput.setup_torch(jax.default_backend(), None)
    reference = profile_timm(_CONFIG.value, _MODE.value, _BATCH.value, _STEPS.value, _DTYPE.value,
                             _TIMM_COMPILE.value)
    print(f"\ntimm: {reference['step_s'] * 1e3:.0f} ms wall; kernels: matrix products "
          f"{reference['gemm_s'] * 1e3:.1f} ms + fused attention "
          f"{reference['attention_s'] * 1e3:.1f} ms + other {reference['other_s'] * 1e3:.1f} ms\n\n"
          '| kernel | ms/step |\n|---|---|')
    print('\n'.join(f"| {r['name'][:100]} | {r['s'] * 1e3:.2f} |"
                    for r in reference['top'][:_ROWS.value]))
    result['timm'] = reference
    if _OUTPUT.value:
      files.write_json(_OUTPUT.value, result)


if __name__ == '__main__':
  _CONFIG = flags.DEFINE_enum('config', 'swin_t_32', list(throughput.CONFIGS), 'Benchmark model.')
  _MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Which step to profile.')
  _GELU = flags.DEFINE_enum('gelu', 'tanh', ['tanh', 'erf'], 'Our GELU form.')
  _BATCH = flags.DEFINE_integer('batch', 128, 'Images per step.', lower_bound=1)
  _STEPS = flags.DEFINE_integer('steps', 3, 'Traced steps (times are per step).', lower_bound=1)
  _ROWS = flags.DEFINE_integer('rows', 25, 'Rows per printed table.', lower_bound=1)
  _DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'model.dtype.')
  _ATTENTION = flags.DEFINE_enum('attention', 'einsum', list(ATTENTION_CORES),
                                 'model.attention.')
  _TIMM = flags.DEFINE_bool('timm', False, "Also profile timm's step (same model, torch's profiler).")
  _TIMM_COMPILE = flags.DEFINE_bool('timm_compile', False, 'With --timm: under torch.compile.')
  _OUTPUT = flags.DEFINE_string('output', '', 'Write the summary here as JSON.')
  _TRACE_OUT = flags.DEFINE_string(
      'trace_out', '', 'Keep the perfetto trace and compiled HLO (gzipped) in this folder.')
  app.run(main)
