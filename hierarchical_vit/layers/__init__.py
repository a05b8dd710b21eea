"""Building blocks: stems, window attention, Swin blocks and stages."""

from hierarchical_vit.layers.attention import WindowAttention
from hierarchical_vit.layers.common import (DropPath, Dropout, Mlp, dense, layer_norm, on_tokens,
                                           reseed_per_example)
from hierarchical_vit.layers.embedding import STEMS, ConvStem, PatchEmbed
from hierarchical_vit.layers.swin import SwinBlock, SwinStage
