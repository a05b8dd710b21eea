"""Fashion-MNIST canvases: an offline segmentation data set with derived labels.

Each 64x64 canvas holds 2-4 Fashion-MNIST items (28x28) at random positions.
Items may overlap; later items lie on top. The labels are derived from the
items, not annotated: a pixel gets the class + 1 of the topmost item whose own
intensity there is above THRESHOLD, else 0 (background), so 11 classes.

Where an item is below THRESHOLD (its faint rim, its black square) it does not
cover what lies beneath: the canvas keeps the brighter of the two, so every
labelled pixel shows its item's own intensity and every background pixel is
at most THRESHOLD.

Everything depends only on the generator passed in: `prepare.py` seeds one per
(split, canvas index), which makes each canvas reproducible on its own.
"""

import dataclasses

import numpy as np

SIZE = 64
ITEM_SIZE = 28
NUM_ITEMS = (2, 4)  # Inclusive range of items per canvas.
# uint8 intensity above which an item's pixel belongs to the item (~12.5%):
# keeps most of dark items' silhouettes, drops the faint anti-aliased rims.
THRESHOLD = 32
CLASS_NAMES = ('background', 'T-shirt/top', 'Trouser', 'Pullover', 'Dress',
               'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')


@dataclasses.dataclass(frozen=True)
class Placement:
  """Source item `item` pasted with its top-left corner at (y, x)."""
  item: int
  y: int
  x: int


def sample_placements(num_source_items: int,
                      rng: np.random.Generator) -> list[Placement]:
  """NUM_ITEMS random items at uniform positions fully inside the canvas."""
  count = rng.integers(NUM_ITEMS[0], NUM_ITEMS[1] + 1)
  items = rng.integers(0, num_source_items, count)
  corners = rng.integers(0, SIZE - ITEM_SIZE + 1, (count, 2))
  return [Placement(int(i), int(y), int(x)) for i, (y, x) in zip(items, corners)]


def render(images: np.ndarray, labels: np.ndarray,
           placements: list[Placement]) -> tuple[np.ndarray, np.ndarray]:
  """Pastes items in order (later on top).

  Args:
    images: uint8 (N, 28, 28) source items.
    labels: int (N,) their classes in 0..9.
    placements: which items go where.

  Returns:
    (canvas, mask): uint8 (SIZE, SIZE) each; mask holds class + 1 or 0.
  """
  canvas = np.zeros((SIZE, SIZE), np.uint8)
  mask = np.zeros((SIZE, SIZE), np.uint8)
  for p in placements:
    item = images[p.item]
    window = np.s_[p.y:p.y + ITEM_SIZE, p.x:p.x + ITEM_SIZE]
    on = item > THRESHOLD
    canvas[window] = np.where(on, item, np.maximum(canvas[window], item))
    mask[window] = np.where(on, labels[p.item] + 1, mask[window])
  return canvas, mask


def make_canvas(images: np.ndarray, labels: np.ndarray,
                rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, list[Placement]]:
  """A random canvas: (canvas, mask, placements); see `render` for shapes."""
  placements = sample_placements(len(images), rng)
  return (*render(images, labels, placements), placements)
