"""Resampling between resolutions: the registries the configs select from.

DOWNSAMPLERS: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out), C_out = 2C by default.
UPSAMPLERS:   (B, H, W, C) -> (B, f*H, f*W, C_out), f = 2 and C_out = C/2 by default.
Every entry is an nnx.Module class constructed as
`cls(in_features, out_features=None, *, rngs, **options)` and records the
width it produces as `.out_features`.
"""

import inspect
from collections.abc import Mapping

from flax import nnx

from hierarchical_vit.resampling.downsample import DOWNSAMPLERS
from hierarchical_vit.resampling.rearrange import space_to_depth
from hierarchical_vit.resampling.upsample import UPSAMPLERS


_REGISTRIES = {'downsample': DOWNSAMPLERS, 'upsample': UPSAMPLERS}
# Constructor arguments the models fill in themselves, never config options.
_SET_BY_MODEL = frozenset({'self', 'in_features', 'out_features', 'rngs', 'dtype'})


def lookup(kind: str, name: str) -> type[nnx.Module]:
  """The class registered as `name` for `kind` ('downsample' or 'upsample', the
  config.model field); ValueError naming the field and the valid choices."""
  registered = _REGISTRIES[kind]
  if name not in registered:
    raise ValueError(f'model.{kind}={name!r} is not a registered {kind}r; '
                     f'valid choices: {sorted(registered)}')
  return registered[name]


def selected_options(kind: str, name: str, options: Mapping[str, Mapping] | None,
                     reserved: dict[str, str] | None = None) -> dict:
  """The options of resampler `name` from config.model.<kind>_options, checked
  (check_options). The mapping may hold options of other registered names too,
  for an ablation to switch between; a name no registry holds is a typo."""
  options = dict(options or {})
  unknown = sorted(set(options) - set(_REGISTRIES[kind]))
  if unknown:
    raise ValueError(f'model.{kind}_options has options for {unknown}, not registered '
                     f'{kind}rs; valid choices: {sorted(_REGISTRIES[kind])}')
  selected = dict(options.get(name, {}))
  check_options(kind, name, selected, reserved)
  return selected


def check_options(kind: str, name: str, options: dict,
                  reserved: dict[str, str] | None = None) -> None:
  """ValueError naming `model.<kind>_options.<name>.<key>` for an option that
  the module `name` does not take, or that the caller sets itself (`reserved`
  maps such keys to the reason), instead of a TypeError from the constructor."""
  reserved = reserved or {}
  prefix = f'model.{kind}_options.{name}'
  for key, reason in reserved.items():
    if key in options:
      raise ValueError(f'{prefix}.{key}={options[key]!r} cannot be set: {reason}')
  params = inspect.signature(lookup(kind, name).__init__).parameters
  valid = sorted(set(params) - _SET_BY_MODEL - set(reserved))
  for key in options:
    if key not in valid:
      raise ValueError(f'{prefix}.{key} is not an option of {kind}r {name!r}; '
                       f'valid keys: {valid}')


def make_downsampler(name: str, in_features: int, out_features: int | None = None, *,
                     rngs: nnx.Rngs, **options) -> nnx.Module:
  """Builds DOWNSAMPLERS[name]; unknown names raise ValueError listing the choices."""
  return lookup('downsample', name)(in_features, out_features, rngs=rngs, **options)


def make_upsampler(name: str, in_features: int, out_features: int | None = None, *,
                   rngs: nnx.Rngs, **options) -> nnx.Module:
  """Builds UPSAMPLERS[name]; unknown names raise ValueError listing the choices."""
  return lookup('upsample', name)(in_features, out_features, rngs=rngs, **options)
