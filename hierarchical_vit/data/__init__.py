"""Input pipeline: tfds array_record sources, grain preprocessing, batch mixing."""

from hierarchical_vit.data.mixing import mix_batch
from hierarchical_vit.data.pipeline import DatasetInfo
from hierarchical_vit.data.pipeline import check_preprocessing
from hierarchical_vit.data.pipeline import check_split
from hierarchical_vit.data.pipeline import create_eval_iterator
from hierarchical_vit.data.pipeline import create_train_iterator
from hierarchical_vit.data.pipeline import get_dataset_info
from hierarchical_vit.data.pipeline import iter_eval_examples
from hierarchical_vit.data.pipeline import load_eval_examples
from hierarchical_vit.data.pipeline import SEGMENTATION_LABELS
from hierarchical_vit.data.pipeline import seek_train_iterator
from hierarchical_vit.data.sources import MissingDataError
from hierarchical_vit.data.transforms import IGNORE_INDEX
