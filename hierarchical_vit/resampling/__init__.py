"""Resampling between resolutions: the registries the configs select from.

DOWNSAMPLERS: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out), C_out = 2C by default.
UPSAMPLERS:   (B, H, W, C) -> (B, f*H, f*W, C_out), f = 2 and C_out = C/2 by default.
Every entry is an nnx.Module class constructed as
`cls(in_features, out_features=None, *, rngs, **options)` and records the
width it produces as `.out_features`.
"""

from hierarchical_vit.resampling.downsample import DOWNSAMPLERS
from hierarchical_vit.resampling.rearrange import depth_to_space, space_to_depth
from hierarchical_vit.resampling.upsample import UPSAMPLERS


def _lookup(registry: dict, kind: str, name: str):
  if name not in registry:
    raise ValueError(f'model.{kind}={name!r} is not a registered {kind}r; '
                     f'valid choices: {sorted(registry)}')
  return registry[name]


def make_downsampler(name: str, in_features: int, out_features: int | None = None, *,
                     rngs, **options):
  """Builds DOWNSAMPLERS[name]; unknown names raise ValueError listing the choices."""
  return _lookup(DOWNSAMPLERS, 'downsample', name)(in_features, out_features, rngs=rngs, **options)


def make_upsampler(name: str, in_features: int, out_features: int | None = None, *,
                   rngs, **options):
  """Builds UPSAMPLERS[name]; unknown names raise ValueError listing the choices."""
  return _lookup(UPSAMPLERS, 'upsample', name)(in_features, out_features, rngs=rngs, **options)
