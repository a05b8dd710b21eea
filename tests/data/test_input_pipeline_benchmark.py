"""benchmarks/input_pipeline.py times the real training pipeline."""

from benchmarks import input_pipeline


def test_measure_reads_the_prepared_data_with_the_training_augmentation(fashion_mnist_dir):
  result = input_pipeline.measure(str(fashion_mnist_dir), num_workers=0, batch=16, batches=3,
                                  warmup=1)
  assert result['batches'] == 3 and result['batch'] == 16 and result['img_s'] > 0
  assert result['crop_padding'] == 4 and result['hflip']  # configs/fashion_mnist.py's.
