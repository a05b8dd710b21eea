r"""Train-step and eval throughput of our Swin against timm's, in one process.

What is timed is what training runs: `trainer.make_train_step` (AdamW with
clipping, label smoothing, the step's metrics) jitted with the state donated,
and `trainer.make_eval_step`. timm runs the same model (same shapes, drop path,
clipping, label smoothing) with torch's AdamW. Contestants are interleaved in
rounds (ours, timm, ours eval, timm eval, matmul peak) so that load from other
processes hits them alike; figures are medians over rounds.

Ratios ours/timm are paired: each round's ratio compares the two sides timed
back to back in that round; the figure is the median over rounds, printed with
the lowest and highest round so that a table shows how far one round moves it.

MFU = (3 x the forward's matmul and convolution FLOPs per image,
report.matmul_flops) x img/s / peak, with the peak a jitted matmul in the
benchmark's dtype (2048^2 on CPU, 8192^2 on accelerators) timed in the same
rounds. The FLOPs are the architecture's, one count for both sides: XLA's count
of all ops (report.forward_flops) would credit an exact-erf GELU ~4% more work
than a tanh one. Results before 2026-11-26 22:00 UTC used XLA's count
(`train_gflop_per_img` in their JSON).

  python -m benchmarks.throughput --output=throughput.json   # small, swin_t_32 on CPU
  python -m benchmarks.throughput --configs=swin_t_224 --gelu=erf   # accelerators
  python -m benchmarks.throughput --configs=swin_t_224 --gelu=erf --dtype=bfloat16 \
      --attention=einsum --attention=cudnn --timm_compile   # two variants, one timm
"""

# pylint: disable=wrong-import-position
from hierarchical_vit import tcmalloc

if __name__ == '__main__':
  # Before the heavy imports, which the re-executed process repeats. Both
  # contestants share this process, hence the allocator (set
  # HIERARCHICAL_VIT_TCMALLOC=0 to time both under glibc malloc).
  tcmalloc.reexec_with_tcmalloc()

import dataclasses
import functools
import itertools
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from configs import base
from hierarchical_vit import files, report
from hierarchical_vit.layers.attention import ATTENTION_CORES
from hierarchical_vit.layers.swin import REMAT_POLICIES
from hierarchical_vit.presets import apply_preset
from hierarchical_vit.training import optimizer as optimizer_lib
from hierarchical_vit.training import trainer

NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """A model to benchmark: our preset and the matching timm arguments."""
  preset: str
  img_size: int
  timm_kwargs: dict


# timm's swin_tiny_patch4_window7_224 with these overrides is our preset.
_CIFAR_TIMM = dict(img_size=32, patch_size=2, window_size=4)
CONFIGS = {
    'small': BenchConfig('cifar_small', 32, dict(_CIFAR_TIMM, embed_dim=48, depths=(2, 2, 2),
                                                 num_heads=(3, 6, 12))),
    'swin_t_32': BenchConfig('cifar_swin_t', 32, _CIFAR_TIMM),
    'swin_t_224': BenchConfig('swin_t', 224, {}),
}


def _rss_mib() -> float:
  """Peak resident memory of this process so far (both frameworks)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_config(bench: BenchConfig, gelu_approximate: bool, dtype: str = 'float32',
                 attention: str = 'einsum', remat: str = 'none') -> ml_collections.ConfigDict:
  """Full config (train defaults of configs/base.py) for a benchmark model."""
  config = base.get_config()
  apply_preset(config.model, bench.preset)
  config.model.num_classes = NUM_CLASSES
  config.model.gelu_approximate = gelu_approximate
  config.model.dtype = dtype
  config.model.attention = attention
  config.model.remat = remat
  return config


class MatmulPeak:
  """Times a jitted (n, n) @ (n, n) in `dtype`: the attainable matmul FLOP/s.

  The MFU of a bf16 run is against a bf16 peak; on accelerators n must be
  large (8192) for the matmul to reach the card's throughput.
  """

  def __init__(self, n: int = 2048, reps: int = 10, dtype: str = 'float32'):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    self.n, self.dtype = n, dtype
    self.flops = 2 * n ** 3 * reps
    scale = jnp.asarray(1e-3, dtype)  # keeps the repeated products finite in bf16
    self.fn = jax.jit(lambda a: jax.lax.fori_loop(0, reps, lambda _, x: x @ a * scale, a))
    self.a = a
    self.fn(a).block_until_ready()

  def __call__(self) -> float:
    """One timed run; returns GFLOP/s."""
    start = time.perf_counter()
    self.fn(self.a).block_until_ready()
    return self.flops / (time.perf_counter() - start) / 1e9


class Ours:
  """Our jitted train and eval steps on one fixed random batch.

  modes: the steps to compile ('train', 'eval'); a profile of one step skips
  compiling the other (the train step of small takes ~17 s on 2 CPU cores).
  """

  def __init__(self, config: ml_collections.ConfigDict, batch: int,
               modes: tuple[str, ...] = ('train', 'eval')):
    if not modes or set(modes) - {'train', 'eval'}:
      raise ValueError(f"modes={modes!r} must be a non-empty subset of ('train', 'eval')")
    graphdef, eval_graphdef, params, self.rest = trainer.init_model(config)
    steps = 1000
    schedule = optimizer_lib.create_learning_rate_schedule(config.train, steps, steps)
    tx = optimizer_lib.create_optimizer(config.train, schedule)
    self.state = trainer.create_train_state(config, params, tx)
    rng = np.random.default_rng(0)
    size = config.model.img_size
    self.batch = {
        'image': jnp.asarray(rng.standard_normal((batch, size, size, config.model.in_chans),
                                                     np.float32)),
        'label': jnp.asarray(rng.integers(0, NUM_CLASSES, batch, dtype=np.int32)),
        'mask': jnp.ones(batch, bool),
    }
    train_batch = {k: self.batch[k] for k in ('image', 'label')}

    if 'train' in modes:
      start = time.perf_counter()
      self.train_step = jax.jit(
          trainer.make_train_step(graphdef, tx, schedule, config),
          donate_argnums=0).lower(self.state, train_batch, self.rest).compile()
      self.train_compile_s = time.perf_counter() - start
    if 'eval' in modes:
      start = time.perf_counter()
      self.eval_step = jax.jit(trainer.make_eval_step(eval_graphdef, NUM_CLASSES)).lower(
          self.state['params'], self.batch, self.rest).compile()
      self.eval_compile_s = time.perf_counter() - start
    self.train_batch = train_batch
    model = nnx.merge(eval_graphdef, params, self.rest)
    self.num_params = report.count_params(model)
    self.model_flops_per_image = report.matmul_flops(model, self.batch['image'].shape) / batch

  def memory(self) -> dict[str, float]:
    """XLA's static buffer sizes of the compiled train step, MiB."""
    mem = self.train_step.memory_analysis()
    if mem is None:
      return {}
    mib = lambda b: b / 2**20
    return {'xla_args_mib': mib(mem.argument_size_in_bytes),
            'xla_temp_mib': mib(mem.temp_size_in_bytes),
            'xla_peak_mib': mib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                + mem.temp_size_in_bytes - mem.alias_size_in_bytes)}

  def train(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.train_step(self.state, self.train_batch, self.rest)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - start

  def eval(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      sums = self.eval_step(self.state['params'], self.batch, self.rest)
    jax.block_until_ready(sums)
    return time.perf_counter() - start


class Timm:
  """timm's Swin with torch AdamW, clipping and label smoothing, as ours trains."""

  def __init__(self, bench: BenchConfig, config: ml_collections.ConfigDict, batch: int,
               compile_model: bool = False):
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    self.torch = torch
    tc = config.train
    self.model = timm.create_model('swin_tiny_patch4_window7_224', num_classes=NUM_CLASSES,
                                   drop_path_rate=config.model.drop_path_rate,
                                   **bench.timm_kwargs)
    self.num_params = sum(p.numel() for p in self.model.parameters())
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.learning_rate,
                                       betas=(tc.b1, tc.b2), weight_decay=tc.weight_decay)
    self.loss = torch.nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    self.clip = tc.grad_clip_norm
    gen = torch.Generator().manual_seed(0)
    size = bench.img_size
    # On the GPU when there is one (the same card as ours); bf16 as autocast.
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    self.model.to(self.device)
    self.compiled = compile_model
    if compile_model:  # Lazy: compiles at the first (warm-up) step.
      self.model = torch.compile(self.model)
    self.images = torch.randn(batch, 3, size, size, generator=gen).to(self.device)
    self.labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(self.device)
    self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16,
                                      enabled=config.model.dtype == 'bfloat16')

  def _sync(self) -> None:
    if self.device.type == 'cuda':
      self.torch.cuda.synchronize()

  def train(self, steps: int) -> float:
    self.model.train()
    start = time.perf_counter()
    for _ in range(steps):
      self.optimizer.zero_grad(set_to_none=True)
      with self.autocast():
        loss = self.loss(self.model(self.images), self.labels)
      loss.backward()
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
      self.optimizer.step()
    self._sync()
    return time.perf_counter() - start

  def eval(self, steps: int) -> float:
    self.model.eval()
    start = time.perf_counter()
    with self.torch.no_grad(), self.autocast():
      for _ in range(steps):
        self.model(self.images)
    self._sync()
    return time.perf_counter() - start


def _timm_available() -> bool:
  try:
    import timm  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


# The torch device whose timings can stand next to JAX's on each backend.
_TORCH_DEVICE = {'cpu': 'cpu', 'gpu': 'cuda'}


def setup_torch(backend: str, threads: int | None) -> dict[str, Any]:
  """Readies torch for timm's side on the device that matches JAX's `backend`,
  with `threads` CPU threads (None: the CPU count); returns what a result
  records of it. A ratio of a GPU against a CPU would mean nothing.

  On a GPU both sides run float32 matmuls in TF32: XLA's default precision
  does, torch's default would not, and the peak (a JAX matmul) would then be
  another arithmetic than timm's.
  """
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  if _TORCH_DEVICE.get(backend) != device:
    raise RuntimeError(f'JAX runs on {backend!r} but torch on {device!r}: install the '
                       'matching torch (or jax) build, or pass --notimm.')
  torch.set_num_threads(threads or os.cpu_count())
  if device == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  return {'timm_device': device, 'torch': torch.__version__, 'timm': timm.__version__,
          'torch_threads': torch.get_num_threads(),
          'float32_matmuls': 'tf32' if device == 'cuda' else 'float32',
          # timm's Swin uses F.scaled_dot_product_attention only with
          # TIMM_FUSED_ATTN=2 (experimental); else explicit matmuls and softmax.
          'timm_fused_attn_env': os.environ.get('TIMM_FUSED_ATTN', '')}


def timm_for(name: str, dtype: str, batch: int, compile_model: bool) -> Timm:
  """timm's model for a benchmark: the GELU form, attention core and remat are
  ours alone (timm's GELU is exact), so one (compiled) timm serves every
  variant of ours on the same model."""
  config = model_config(CONFIGS[name], gelu_approximate=False, dtype=dtype)
  return Timm(CONFIGS[name], config, batch, compile_model)


def paired_ratio(ours_s: list[float], reference_s: list[float]) -> dict[str, float]:
  """Median, min and max over rounds of the reference's time / ours (a
  speedup); the reference is timm's step, or attention_core's einsum core."""
  if len(ours_s) != len(reference_s) or not ours_s:
    raise ValueError(f'need one reference time per round of ours, got {len(reference_s)} and '
                     f'{len(ours_s)}')
  ratios = [t / o for o, t in zip(ours_s, reference_s)]
  return {'median': statistics.median(ratios), 'min': min(ratios), 'max': max(ratios)}


def benchmark(name: str, gelu: str, peak: MatmulPeak, batch: int, steps: int,
              rounds: int, timm_model: Timm | None = None, dtype: str = 'float32',
              attention: str = 'einsum', remat: str = 'none') -> dict[str, Any]:
  """Interleaved timed rounds of ours (and `timm_model`, built by `timm_for`
  for the same name and dtype) on CONFIGS[name]."""
  config = model_config(CONFIGS[name], gelu_approximate=gelu == 'tanh', dtype=dtype,
                        attention=attention, remat=remat)
  ours = Ours(config, batch)
  contestants: dict[str, Callable[[int], float]] = {'ours_train': ours.train}
  if timm_model:  # Each of ours is timed next to its timm counterpart.
    contestants['timm_train'] = timm_model.train
  contestants['ours_eval'] = ours.eval
  if timm_model:
    contestants['timm_eval'] = timm_model.eval
  for fn in contestants.values():  # Warm-up: allocators, caches, torch's first step.
    fn(1)
  times = {k: [] for k in contestants}
  peaks = []
  for _ in range(rounds):
    for key, fn in contestants.items():
      times[key].append(fn(steps))
    peaks.append(peak())

  result = {
      'config': name, 'gelu': gelu, 'dtype': dtype, 'attention': attention, 'remat': remat,
      'timm_compile': bool(timm_model and timm_model.compiled),
      'batch': batch, 'params': int(ours.num_params),
      'train_model_gflop_per_img': 3 * ours.model_flops_per_image / 1e9,
      'peak_gflops': statistics.median(peaks), 'peak_matmul': f'{peak.dtype} {peak.n}^2',
      'train_compile_s': ours.train_compile_s, 'eval_compile_s': ours.eval_compile_s,
      **ours.memory(),
  }
  for key, ts in times.items():
    result[f'{key}_img_s'] = steps * batch / statistics.median(ts)
  result['ours_train_mfu'] = (result['ours_train_img_s'] * result['train_model_gflop_per_img']
                              / result['peak_gflops'])
  if timm_model:
    result['timm_params'] = int(timm_model.num_params)
    result['timm_train_mfu'] = (result['timm_train_img_s'] * result['train_model_gflop_per_img']
                                / result['peak_gflops'])
    for mode in ('train', 'eval'):
      ratio = paired_ratio(times[f'ours_{mode}'], times[f'timm_{mode}'])
      result[f'{mode}_ratio'] = ratio['median']
      result[f'{mode}_ratio_range'] = [ratio['min'], ratio['max']]
  return result


def format_table(results: list[dict[str, Any]]) -> str:
  """A Markdown table of the results."""
  columns = [('config', 'config', '{}'), ('gelu', 'gelu', '{}'),
             ('attention', 'attention', '{}'), ('remat', 'remat', '{}'),
             ('ours train img/s', 'ours_train_img_s', '{:.0f}'),
             ('timm train img/s', 'timm_train_img_s', '{:.0f}'),
             ('train ratio', 'train_ratio', '{:.2f}'),
             ('ours eval img/s', 'ours_eval_img_s', '{:.0f}'),
             ('timm eval img/s', 'timm_eval_img_s', '{:.0f}'),
             ('eval ratio', 'eval_ratio', '{:.2f}'),
             ('ours MFU', 'ours_train_mfu', '{:.0%}'),
             ('timm MFU', 'timm_train_mfu', '{:.0%}'),
             ('peak GFLOP/s', 'peak_gflops', '{:.0f}'),
             ('compile s (train/eval)', None, None),
             ('XLA peak MiB', 'xla_peak_mib', '{:.0f}')]
  lines = ['| ' + ' | '.join(c[0] for c in columns) + ' |',
           '|' + '---|' * len(columns)]
  for r in results:
    cells = []
    for _, key, fmt in columns:
      if key is None:
        cells.append(f'{r["train_compile_s"]:.1f} / {r["eval_compile_s"]:.1f}')
      elif f'{key}_range' in r:  # A paired ratio: the median (lowest-highest round).
        cells.append(fmt.format(r[key]) + ' ({:.2f}-{:.2f})'.format(*r[f'{key}_range']))
      else:
        cells.append(fmt.format(r[key]) if key in r else '-')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def cpu_model(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The CPU's model name from Linux's cpuinfo, else the architecture: runs on
  different machines (these 2-core VMs are AMD or Intel) are told apart by it."""
  try:
    with open(cpuinfo, encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def leave_gpu_memory_to_torch() -> None:
  """Before JAX's first use, where timm runs beside ours: JAX's client would
  otherwise take 75% of a GPU's memory before timm's model exists."""
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')


def main(argv):
  del argv
  if _TIMM.value:
    leave_gpu_memory_to_torch()
  backend = jax.default_backend()
  names = _CONFIGS.value or (['small', 'swin_t_32'] if backend == 'cpu' else list(CONFIGS))
  with_timm = _TIMM.value and _timm_available()
  if _TIMM.value and not with_timm:
    logging.warning('timm does not import: ours alone (pip install -e .[interop]).')
  timm_info = setup_torch(backend, _THREADS.value) if with_timm else {}
  peak_size = _PEAK_SIZE.value or (2048 if backend == 'cpu' else 8192)
  peak = MatmulPeak(peak_size, dtype=_DTYPE.value)
  gelus = ['tanh', 'erf'] if _GELU.value == 'both' else [_GELU.value]
  summary = {
      'date': time.strftime('%Y-%m-%d %H:%M'), 'backend': backend,
      'devices': [str(d) for d in jax.devices()], 'machine': cpu_model(),
      'cpu_count': os.cpu_count(), 'jax': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'ld_preload': os.environ.get('LD_PRELOAD', ''),
      'xla_python_client_preallocate': os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE', ''),
      **timm_info, 'results': [],
  }
  results = summary['results']
  for name in names:
    timm_model = (timm_for(name, _DTYPE.value, _BATCH.value, _TIMM_COMPILE.value)
                  if with_timm else None)
    for gelu in gelus:
      for attention, remat in itertools.product(_ATTENTION.value, _REMAT.value):
        results.append(benchmark(name, gelu, peak, _BATCH.value, _STEPS.value, _ROUNDS.value,
                                 timm_model, _DTYPE.value, attention, remat))
        print(json.dumps(results[-1]), flush=True)
        # Written after each variant, so that one that crashes (a kernel the
        # card lacks) keeps the figures of those before it.
        summary.update(load_average=os.getloadavg(), peak_rss_mib=_rss_mib())
        if _OUTPUT.value:
          files.write_json(_OUTPUT.value, summary)
  print(format_table(results))
  print(f'load average {summary["load_average"]}, peak RSS {summary["peak_rss_mib"]:.0f} MiB')


if __name__ == '__main__':
  # Defined here, not at import, so that tests can import this module next
  # to other modules' flags.
  _CONFIGS = flags.DEFINE_list(
      'configs', None, 'Names in CONFIGS; default: small,swin_t_32 on CPU, all three elsewhere.')
  flags.register_validator('configs', lambda names: names is None or set(names) <= set(CONFIGS),
                           message=f'--configs: names in {sorted(CONFIGS)}')
  _BATCH = flags.DEFINE_integer('batch', 128, 'Images per step.', lower_bound=1)
  _STEPS = flags.DEFINE_integer('steps', 5, 'Steps per timed round and contestant.',
                                lower_bound=1)
  _ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved timed rounds; figures are medians.',
                                 lower_bound=1)
  _GELU = flags.DEFINE_enum('gelu', 'both', ['tanh', 'erf', 'both'],
                            'Our GELU form (timm always uses exact erf).')
  _DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                             'Compute dtype of both (ours: model.dtype; timm: autocast).')
  _ATTENTION = flags.DEFINE_multi_enum(
      'attention', ['einsum'], list(ATTENTION_CORES),
      'Our attention cores (model.attention); each is a variant of ours, timed against the '
      'same timm.')
  _REMAT = flags.DEFINE_multi_enum(
      'remat', ['none'], list(REMAT_POLICIES),
      'Our per-block recomputations (model.remat), crossed with --attention: XLA peak MiB '
      'shows what each saves.')
  _TIMM = flags.DEFINE_bool('timm', True, 'Time timm beside ours if it imports.')
  _TIMM_COMPILE = flags.DEFINE_bool('timm_compile', False,
                                    "Run timm's model through torch.compile (compiled at warm-up).")
  _THREADS = flags.DEFINE_integer('torch_threads', None, 'torch threads; default: CPU count.',
                                  lower_bound=1)
  _PEAK_SIZE = flags.DEFINE_integer(
      'peak_size', None,
      'Side of the peak matmul (in --dtype); default: 2048 on CPU, 8192 elsewhere.', lower_bound=1)
  _OUTPUT = flags.DEFINE_string('output', '', 'Write the results here as JSON.')
  app.run(main)
