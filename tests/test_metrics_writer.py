"""MetricsWriter (metrics.jsonl + TensorBoard) and the plots made from its file."""
import glob
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from coma_jax import plot
from coma_jax.training.metrics_writer import MetricsWriter

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _train_metrics(step):
  return {'loss': np.float32(1.0 / step), 'lr': 1e-4 * step, 'tokens': np.int64(100 * step),
          'samples_per_s': 8.0 + step, 'tokens_per_s': 4000.0 + step}


def _write_run(workdir, steps, **kwargs):
  with MetricsWriter(workdir, **kwargs) as writer:
    for step in steps:
      metrics = _train_metrics(step)
      if step == 2:
        metrics['grad_norm'] = float('nan')
      if step == 3:
        metrics['aux'] = None
      if step == 4:  # what a jitted step returns
        metrics.update(z_loss=jnp.asarray(0.5, jnp.bfloat16), bad=jnp.asarray(jnp.inf))
      writer.write(step, metrics)
    writer.write(2, {'loss': 0.7, 'recall_at_1': np.float64(0.25)}, split='validation')


def _lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]  # strict: a bare NaN token would fail here


def _read_tensorboard_scalars(tensorboard_dir):
  """({tag: {step: value}}, purge steps) from the event files, read as TFRecords with tensorboardX's
  own protos, so no TensorFlow or tensorboard is needed. A purge marker drops the later steps read
  before it, as TensorBoard does."""
  from tensorboardX.proto import event_pb2
  scalars, purge_steps = {}, []
  for path in sorted(glob.glob(os.path.join(tensorboard_dir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack_from('Q', data, offset)
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4  # length, its crc, the record, its crc
      if event.session_log.status == event_pb2.SessionLog.START:
        purge_steps.append(event.step)
        for values in scalars.values():
          for step in [s for s in values if s >= event.step]:
            del values[step]
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars, purge_steps


def test_writes_valid_json_with_nulls_and_tensorboard_scalars(tmp_path):
  workdir = str(tmp_path)
  _write_run(workdir, range(1, 6))
  lines = _lines(workdir)
  assert [line['step'] for line in lines] == [1, 2, 3, 4, 5, 2]
  assert lines[1]['grad_norm'] is None and lines[2]['aux'] is None
  assert lines[3]['z_loss'] == 0.5 and lines[3]['bad'] is None
  assert 'NaN' not in open(os.path.join(workdir, 'metrics.jsonl')).read()
  assert lines[0] == {'step': 1, 'loss': 1.0, 'lr': 1e-4, 'tokens': 100, 'samples_per_s': 9.0,
                      'tokens_per_s': 4001.0}
  assert lines[-1] == {'step': 2, 'split': 'validation', 'loss': 0.7, 'recall_at_1': 0.25}

  event_files = glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
  assert event_files and all(os.path.getsize(p) > 0 for p in event_files)
  scalars, purge_steps = _read_tensorboard_scalars(os.path.join(workdir, 'tensorboard'))
  assert purge_steps == []
  assert scalars['train/loss'] == pytest.approx({s: 1.0 / s for s in range(1, 6)})
  assert np.isnan(scalars['train/grad_norm'][2])
  assert 'train/aux' not in scalars
  assert scalars['train/z_loss'] == {4: 0.5}
  assert scalars['validation/recall_at_1'] == {2: 0.25}


def test_truncate_after_then_rewrite_keeps_each_step_once(tmp_path):
  workdir = str(tmp_path)
  _write_run(workdir, range(1, 6))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 6, "loss": 0.1')  # a write cut off by the crash
  with MetricsWriter(workdir) as writer:  # the resumed run, restored from the step-3 checkpoint
    writer.truncate_after(3)
    for step in (4, 5):
      writer.write(step, {'loss': 10.0 + step})
  lines = _lines(workdir)
  assert [line['step'] for line in lines if 'split' not in line] == [1, 2, 3, 4, 5]
  assert [line['step'] for line in lines if line.get('split') == 'validation'] == [2]
  assert not glob.glob(os.path.join(workdir, '*.tmp'))

  assert [line['loss'] for line in lines if line['step'] > 3] == [14.0, 15.0]

  scalars, purge_steps = _read_tensorboard_scalars(os.path.join(workdir, 'tensorboard'))
  assert purge_steps == [4]
  assert scalars['train/loss'] == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3, 4: 14.0, 5: 15.0})
  assert 5 not in scalars['train/samples_per_s']  # purged, and not written again
  assert sorted(scalars['validation/loss']) == [2]


def test_truncate_drops_torn_last_line_and_later_steps(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
  writer = MetricsWriter(workdir)
  writer.truncate_after(10)
  writer.write(3, {'loss': 0.25})
  writer.close()
  assert _lines(workdir) == [{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 0.5},
                             {'step': 3, 'loss': 0.25}]


def test_plot_writes_pngs(tmp_path, capsys):
  workdir = str(tmp_path)
  _write_run(workdir, range(1, 6))
  assert plot.main([workdir]) == 0
  printed = capsys.readouterr().out.split()
  for name in ('loss.png', 'throughput.png', 'validation.png'):
    path = os.path.join(workdir, 'plots', name)
    assert path in printed
    with open(path, 'rb') as f:
      data = f.read()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_plot_names_missing_metrics_file(tmp_path, capsys):
  assert plot.main([str(tmp_path)]) != 0
  assert os.path.join(str(tmp_path), 'metrics.jsonl') in capsys.readouterr().err


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = os.path.join(str(tmp_path), 'run')
  _write_run(workdir, range(1, 4), enabled=False)
  MetricsWriter(workdir, enabled=False).truncate_after(1)
  assert not os.path.exists(workdir)
