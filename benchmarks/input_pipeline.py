r"""Throughput of the training input pipeline alone (no model).

Times `hierarchical_vit.data.create_train_iterator` on Fashion-MNIST with the
train-time augmentation (32x32 pad, random crop with 4-pixel padding,
horizontal flip, normalize), i.e. what feeds `configs/fashion_mnist.py`.
Prepare the data once:

  python -m hierarchical_vit.data.prepare --dataset=fashion_mnist --data_dir=data
  python -m benchmarks.input_pipeline --data_dir=data --output=input_pipeline.json
"""

# pylint: disable=wrong-import-position
from hierarchical_vit import tcmalloc

if __name__ == '__main__':
  # Before the heavy imports, which the re-executed process repeats: timed
  # under the allocator that train.py and eval.py run with.
  tcmalloc.reexec_with_tcmalloc()

import os
import time

from absl import app, flags

from configs import fashion_mnist
from hierarchical_vit import data, files


def measure(data_dir: str, num_workers: int, batch: int, batches: int, warmup: int) -> dict:
  """img/s of the train iterator with `num_workers` grain workers."""
  config = fashion_mnist.get_config()
  dc = config.data
  dc.data_dir = data_dir
  dc.num_workers = num_workers
  iterator = data.create_train_iterator(dc, global_batch_size=batch, seed=0)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  seconds = time.perf_counter() - start
  return {'num_workers': num_workers, 'batch': batch, 'batches': batches,
          'crop_padding': dc.crop_padding, 'hflip': dc.hflip,
          'img_s': batches * batch / seconds}


def main(argv):
  del argv
  results = [measure(_DATA_DIR.value, int(w), _BATCH.value, _BATCHES.value, _WARMUP.value)
             for w in _WORKERS.value]
  print('| num_workers | img/s |\n|---|---|')
  for r in results:
    print(f'| {r["num_workers"]} | {r["img_s"]:.0f} |')
  print(f'load average {os.getloadavg()}')
  if _OUTPUT.value:
    files.write_json(_OUTPUT.value, {
        'date': time.strftime('%Y-%m-%d %H:%M'), 'dataset': 'fashion_mnist',
        'load_average': os.getloadavg(), 'results': results})


if __name__ == '__main__':
  # Defined here, not at import, so that tests can import this module next
  # to other modules' flags.
  _DATA_DIR = flags.DEFINE_string('data_dir', 'data', 'tfds data dir holding fashion_mnist.')
  _BATCH = flags.DEFINE_integer('batch', 128, 'Images per batch.', lower_bound=1)
  _BATCHES = flags.DEFINE_integer('batches', 50, 'Timed batches per setting.', lower_bound=1)
  _WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed batches first (fills prefetch).',
                                 lower_bound=0)
  _WORKERS = flags.DEFINE_list('num_workers', ['0', '2'], 'grain worker processes to try.')
  flags.register_validator('num_workers', lambda ws: all(w.strip().isdigit() for w in ws),
                           message='--num_workers: comma-separated ints >= 0, e.g. 0,2')
  _OUTPUT = flags.DEFINE_string('output', '', 'Write the results here as JSON.')
  app.run(main)
