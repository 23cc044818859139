"""Does compression pre-training help? The CoMa effect at laptop scale, on the demo data.

  python -m coma_jax.sweep --sweep configs/sweeps/coma_effect.py --workdir runs/coma_effect   (make sweep)

Every arm starts from the same stage 0 (per seed): generative pre-training that stands in for the
instruction tuning a real Qwen2.5-VL has had (configs/demo.py:stage0). After it, every arm takes
the same number of optimizer steps: stage 2 alone takes them all; the CoMa arms split them into
stage 1 (compression, with the paper's mask or the released code's causal one; K compression
tokens) and stage 2. Evaluated on the demo's held-out set; three seeds each (model init and data
order; the data are the same). `:smoke` is a two-arm, one-seed, few-step version for the tests.
"""
STAGE0_STEPS, STAGE1_STEPS, STAGE2_STEPS = 240, 60, 280


def _stage0(steps):
  return {'name': 'stage0', 'variant': 'stage0', 'overrides': {'train.steps': steps}}


def _stage1(mask, k, steps):
  return {'name': f's1_{mask}_k{k}', 'variant': 'stage1',
          'overrides': {'train.steps': steps, 'stage1.mask': mask, 'model.num_compression_tokens': k}}


def _stage2(name, k, steps):
  return {'name': name, 'variant': 'stage2', 'overrides': {'train.steps': steps, 'model.num_compression_tokens': k}}


def get_sweep(variant: str = 'full'):
  if variant not in ('full', 'smoke'):
    raise ValueError(f'variant must be full or smoke, got {variant!r}')
  smoke = variant == 'smoke'
  s0, s1, s2 = (2, 2, 2) if smoke else (STAGE0_STEPS, STAGE1_STEPS, STAGE2_STEPS)
  arms = {'s0 -> s2': [_stage0(s0), _stage2('s2_k8_alone', 8, s1 + s2)]}
  for mask, k in (('paper', 8), ('causal', 8), ('paper', 4), ('paper', 16)):
    arms[f's0 -> s1 {mask} K{k} -> s2'] = [_stage0(s0), _stage1(mask, k, s1), _stage2('s2', k, s2)]
  if smoke:
    arms = {a: arms[a] for a in ('s0 -> s2', 's0 -> s1 paper K8 -> s2')}
  return {
      'title': 'The CoMa effect at laptop scale' + (' (smoke)' if smoke else ''),
      'config': 'configs/demo.py',
      'data': {'demo': {'size': 'smoke' if smoke else 'full', 'seed': 0}},
      'seeds': [0] if smoke else [0, 1, 2],
      'baseline': 's0 -> s2',
      'arms': arms,
  }
