"""hierarchical_vit: hierarchical Vision Transformers with pluggable resampling."""

__version__ = '0.1.0'
