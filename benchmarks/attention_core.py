r"""The attention cores alone: forward and forward+backward time, and error.

Each core of ATTENTION_CORES (model.attention) runs on the window attention of
one benchmark model's stages, e.g. Swin-T at 224 and batch 128: (8192 windows,
49 tokens, 3 heads, 32) in stage 1, with one bias per window position in the
shifted blocks and one for all windows in the others. Cores are interleaved in
rounds; times are medians, speedups paired per round against `einsum`.
Memory: XLA's temp buffers of the compiled forward+backward (where the einsum
core keeps its (windows, heads, N, N) weights). Error: the largest
|difference| of the output and of the gradients (q, k, v and bias) from the
float32 einsum core on the same inputs, relative to the reference's largest
magnitude.

  python -m benchmarks.attention_core --config=swin_t_224 --dtype=bfloat16 \
      --cores=einsum_lowp --cores=pallas --cores=cudnn --output=attention_core.json   # a GPU
"""

# pylint: disable=wrong-import-position
from hierarchical_vit import tcmalloc

if __name__ == '__main__':
  # Before the heavy imports, which the re-executed process repeats: timed
  # under the allocator that train.py and eval.py run with.
  tcmalloc.reexec_with_tcmalloc()

import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import throughput
from hierarchical_vit import files
from hierarchical_vit.layers import windows as win
from hierarchical_vit.layers.attention import ATTENTION_CORES, pallas_attention


def stage_cases(name: str, batch: int) -> list[dict[str, Any]]:
  """Per stage of CONFIGS[name], the window attention of its blocks: windows,
  tokens, heads, head dim and bias groups (1, or one per window position in a
  shifted block)."""
  model = throughput.model_config(throughput.CONFIGS[name], gelu_approximate=False).model
  side = model.img_size // model.patch_size
  cases = []
  for stage, heads in enumerate(model.num_heads):
    res = side // 2 ** stage
    window, shift = win.stage_window((res, res), model.window_size, model.window_size // 2)
    per_image = (res // window[0]) * (res // window[1])
    base = dict(stage=stage, windows=batch * per_image, tokens=window[0] * window[1],
                heads=heads, head_dim=model.embed_dim * 2 ** stage // heads)
    cases.append(dict(base, shifted=False, groups=1))
    if any(shift):
      cases.append(dict(base, shifted=True, groups=per_image))
  return cases


def core_fn(name: str, interpret: bool) -> Callable[..., jax.Array]:
  """core(q, k, v, bias) of ATTENTION_CORES[name], scale 1/sqrt(d), no dropout."""
  core = ATTENTION_CORES[name]
  if name == 'pallas':
    core = functools.partial(pallas_attention, interpret=interpret)
  return lambda q, k, v, bias: core(q, k, v, bias, q.shape[-1] ** -0.5, lambda w: w)


def _inputs(case: dict[str, Any], dtype: str):
  keys = jax.random.split(jax.random.key(0), 5)
  shape = (case['windows'], case['tokens'], case['heads'], case['head_dim'])
  q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32) for key in keys[:4])
  n = case['tokens']
  bias = jax.random.normal(keys[4], (case['groups'], case['heads'], n, n), jnp.float32)
  return tuple(t.astype(dtype) for t in (q, k, v)), bias, cotangent.astype(dtype)


def _programs(core: Callable[..., jax.Array]):
  """Jitted forward(q, k, v, bias), and forward+backward(q, k, v, bias,
  cotangent) returning the four gradients. The cotangent is an argument: a
  closed-over array would be compiled into the program as a constant."""
  def loss(q, k, v, bias, cotangent):
    return jnp.sum(core(q, k, v, bias).astype(jnp.float32) * cotangent.astype(jnp.float32))

  return jax.jit(core), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _relative_error(ours, reference) -> float:
  ours, reference = (np.asarray(t, np.float32) for t in (ours, reference))
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _timer(fn: Callable, args: tuple, reps: int) -> Callable[[], float]:
  def run() -> float:
    start = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps
  return run


def _checked(name: str, programs, inputs: tuple, cotangent: jax.Array, reference: tuple,
             case: dict[str, Any], dtype: str, reps: int):
  """A core's row (errors, XLA temp MiB) and its timers; compiles and runs it
  once. inputs: (q, k, v, bias)."""
  forward, grads = programs
  grads = grads.lower(*inputs, cotangent).compile()
  out, grad = forward(*inputs), grads(*inputs, cotangent)
  memory = grads.memory_analysis()
  row = dict(case, core=name, dtype=dtype, output_error=_relative_error(out, reference[0]),
             grad_error=max(map(_relative_error, grad, reference[1])),
             # XLA's scratch for the forward+backward: what the core materializes.
             forward_backward_temp_mib=memory and memory.temp_size_in_bytes / 2**20)
  return row, {'forward': _timer(forward, inputs, reps),
               'forward_backward': _timer(grads, (*inputs, cotangent), reps)}


def benchmark_case(case: dict[str, Any], cores: list[str], dtype: str, reps: int, rounds: int,
                   interpret: bool = False) -> list[dict[str, Any]]:
  """One row per core: ms forward and forward+backward, errors, speedup on
  einsum, and the forward+backward's XLA temp buffers. A core that fails to
  compile or run gets a row with its `error` (einsum's failure is raised)."""
  (q, k, v), bias, cotangent = _inputs(case, dtype)
  with jax.default_matmul_precision('highest'):  # Not TF32 on GPUs: the reference.
    f32 = tuple(t.astype(jnp.float32) for t in (q, k, v))
    forward, grads = _programs(core_fn('einsum', interpret))
    reference = (forward(*f32, bias), grads(*f32, bias, cotangent))
  timers, rows = {}, {}
  for name in _reported(cores):
    programs = _programs(core_fn(name, interpret))
    try:
      rows[name], timers[name] = _checked(name, programs, (q, k, v, bias), cotangent, reference,
                                          case, dtype, reps)
    except Exception as error:  # pylint: disable=broad-except
      if name == 'einsum':
        raise
      rows[name] = dict(case, core=name, dtype=dtype, error=f'{type(error).__name__}: {error}')
  times = {(name, mode): [] for name in timers for mode in ('forward', 'forward_backward')}
  for _ in range(rounds):
    for name, modes in timers.items():
      for mode, run in modes.items():
        times[name, mode].append(run())
  for name in timers:
    for mode in ('forward', 'forward_backward'):
      rows[name][f'{mode}_ms'] = 1e3 * statistics.median(times[name, mode])
      rows[name][f'{mode}_speedup'] = throughput.paired_ratio(times[name, mode],
                                                              times['einsum', mode])['median']
  return list(rows.values())  # In _reported's order.


def _reported(cores: list[str]) -> list[str]:
  """einsum, the reference every speedup divides, then the other cores once each."""
  return list(dict.fromkeys(['einsum', *cores]))


CASE_COLUMNS = '| stage | shifted | windows x tokens x heads x d |'


def case_cells(row: dict[str, Any]) -> str:
  """A stage_cases case as the CASE_COLUMNS cells of a Markdown row."""
  return (f"| {row['stage'] + 1} | {'yes' if row['shifted'] else 'no'} | {row['windows']} x "
          f"{row['tokens']} x {row['heads']} x {row['head_dim']} |")


def format_table(rows: list[dict[str, Any]]) -> str:
  lines = [CASE_COLUMNS + ' core | fwd ms | fwd+bwd ms | fwd speedup | fwd+bwd speedup | '
           'fwd+bwd temp MiB | output error | grad error |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if 'error' in r:
      lines.append(f"{case_cells(r)} {r['core']} | failed: {r['error'].splitlines()[0][:80]} |")
      continue
    lines.append(
        f"{case_cells(r)} {r['core']} | {r['forward_ms']:.3f} | "
        f"{r['forward_backward_ms']:.3f} | {r['forward_speedup']:.2f} | "
        f"{r['forward_backward_speedup']:.2f} | {r['forward_backward_temp_mib'] or 0:.0f} | "
        f"{r['output_error']:.1e} | {r['grad_error']:.1e} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  summary = {'date': time.strftime('%Y-%m-%d %H:%M'), 'backend': jax.default_backend(),
             'devices': [str(d) for d in jax.devices()], 'jax': jax.__version__,
             'config': _CONFIG.value, 'batch': _BATCH.value, 'results': []}
  for case in stage_cases(_CONFIG.value, _BATCH.value):
    rows = benchmark_case(case, _CORES.value, _DTYPE.value, _REPS.value, _ROUNDS.value,
                          _INTERPRET.value)
    summary['results'] += rows
    for row in rows:
      print(json.dumps(row), flush=True)
    if _OUTPUT.value:  # After each case: a core that crashes keeps what came before.
      files.write_json(_OUTPUT.value, summary)
  print(format_table(summary['results']))


if __name__ == '__main__':
  _CONFIG = flags.DEFINE_enum('config', 'swin_t_224', list(throughput.CONFIGS),
                              'The model whose stages give the shapes.')
  _BATCH = flags.DEFINE_integer('batch', 128, 'Images per step.', lower_bound=1)
  _DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'], 'q, k, v dtype.')
  _CORES = flags.DEFINE_multi_enum(
      'cores', ['einsum', 'pallas'], list(ATTENTION_CORES),
      'Cores to time (repeat the flag); einsum is always timed and reported, as the '
      'reference.')
  _REPS = flags.DEFINE_integer('reps', 20, 'Calls per timed round.', lower_bound=1)
  _ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds; times are medians.',
                                 lower_bound=1)
  _INTERPRET = flags.DEFINE_bool('interpret', False,
                                 "Run the pallas core in Pallas' interpreter (CPU; slow).")
  _OUTPUT = flags.DEFINE_string('output', '', 'Write the results here as JSON.')
  app.run(main)
