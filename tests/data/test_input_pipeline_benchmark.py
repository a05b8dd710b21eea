"""benchmarks/input_pipeline.py times the real training pipeline."""

from benchmarks import input_pipeline
from hierarchical_vit import data


def test_measure_times_the_train_iterator_of_the_fashion_mnist_config(fashion_mnist_dir,
                                                                      monkeypatch):
  """The iterator train.py builds from configs/fashion_mnist.py (its crop and
  flip included), warmed up, then `batches` batches timed."""
  built, real = [], data.create_train_iterator

  def spy(data_config, **kwargs):
    iterator = real(data_config, **kwargs)
    built.append((data_config, kwargs, iterator))
    return iterator

  monkeypatch.setattr(data, 'create_train_iterator', spy)
  result = input_pipeline.measure(str(fashion_mnist_dir), num_workers=0, batch=16, batches=3,
                                  warmup=1)
  (config, kwargs, iterator), = built
  assert (config.name, config.crop_padding, config.hflip, config.augment) == (
      'fashion_mnist', 4, True, '')
  assert kwargs['global_batch_size'] == 16 and config.data_dir == str(fashion_mnist_dir)
  # 1 + 3 batches read: the next one is the fifth.
  assert result == {'num_workers': 0, 'batch': 16, 'batches': 3, 'crop_padding': 4,
                    'hflip': True, 'img_s': result['img_s']} and result['img_s'] > 0
  fresh = real(config, global_batch_size=16, seed=0)
  for _ in range(4):
    next(fresh)
  assert (next(fresh)['label'] == next(iterator)['label']).all()
