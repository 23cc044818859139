"""A sweep file -> the stage runs of every (arm, seed), with shared prefixes run once.

A sweep file is Python with `get_sweep(variant)` returning:
  config:   the default config file (relative to the repository or absolute);
  data:     {'demo': {'size': 'full', 'seed': 0}} (built into WORKDIR/data, evaluated on its held-out
            set and task table) or {'data_dir': DIR, 'evaluate': [evaluate's arguments]};
  seeds:    [0, 1, 2] (each stage gets --config.seed);
  arms:     {name: [stage, ...]}, a stage {'name', 'variant', 'overrides': {key: value}, 'config'?};
  baseline: the arm the others are compared with, seed by seed (optional).
Stage s of an arm runs in WORKDIR/runs/seed{seed}/{name_1}.{...}.{name_s} from stage s-1's workdir,
so arms whose chains start alike (the same names) share those stages; the same names must then
mean the same stages.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

from coma_jax.experiments.stage_runs import ROOT


class SweepError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  config: str  # FILE:variant
  overrides: tuple  # ((key, value), ...)

  def flags(self, seed: int) -> list[str]:
    return [f'--config.seed={seed}'] + [f'--config.{k}={_flag_value(v)}' for k, v in self.overrides]


def _flag_value(v) -> str:
  if isinstance(v, (tuple, list)):
    return '(' + ','.join(_flag_value(x) for x in v) + (',)' if len(v) == 1 else ')')
  return str(v)


def load_sweep(spec: str) -> dict:
  """FILE[:variant] -> the sweep dict, checked."""
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    raise SweepError(f'sweep file {path} not found')
  module_spec = importlib.util.spec_from_file_location('_sweep', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  sweep = module.get_sweep(variant) if variant else module.get_sweep()
  for key in ('config', 'data', 'seeds', 'arms'):
    if key not in sweep:
      raise SweepError(f'{path}: the sweep has no {key!r}')
  if not sweep['arms'] or not sweep['seeds']:
    raise SweepError(f'{path}: a sweep needs at least one arm and one seed')
  if sweep.get('baseline') and sweep['baseline'] not in sweep['arms']:
    raise SweepError(f'{path}: baseline {sweep["baseline"]!r} is not an arm')
  return sweep


def _config_path(config: str) -> str:
  return config if os.path.isabs(config) else os.path.join(ROOT, config)


def chains(sweep: dict) -> dict[str, list[Stage]]:
  """Arm -> its stages; the same stage name at the same place must be the same stage."""
  out, seen = {}, {}
  for arm, stages in sweep['arms'].items():
    chain, path = [], ()
    for s in stages:
      config = f'{_config_path(s.get("config", sweep["config"]))}:{s["variant"]}'
      stage = Stage(s['name'], config, tuple(sorted(s.get('overrides', {}).items())))
      path += (stage.name,)
      if seen.setdefault(path, stage) != stage:
        raise SweepError(f'arm {arm!r}: stage {"/".join(path)} differs from another arm\'s stage of that name')
      chain.append(stage)
    out[arm] = chain
  return out


def stage_dir(workdir: str, seed: int, chain: list[Stage], upto: int) -> str:
  return os.path.join(workdir, 'runs', f'seed{seed}', '.'.join(s.name for s in chain[:upto + 1]))
