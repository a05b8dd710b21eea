"""Sweep configs for hierarchical_vit.ablate: an experiment config plus `sweep`."""
