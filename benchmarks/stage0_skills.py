"""What a stage-0 run learned: on the demo's stage-1 validation records, the share of captions and
of answers the model predicts exactly (every token the argmax, teacher-forced: exactly what greedy
decoding would write), and per-token accuracy, by kind of record.

  python benchmarks/stage0_skills.py --workdir runs/coma_effect/runs/seed0/stage0 --data_dir runs/coma_effect/data

Works on any stage-1 workdir of the demo (K > 0 too, with the mask the run trained with).
"""
from __future__ import annotations

import argparse
import collections
import re

import jax
import numpy as np

CAPTION = re.compile(r'^(one|two|three|four) shapes?: ')


def kind_of(answer: str) -> str:
  return 'caption' if CAPTION.match(answer) else 'answer'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--data_dir', required=True)
  args = parser.parse_args()

  from coma_jax.data.image import ImageSettings
  from coma_jax.data.loaders import stage1_loader
  from coma_jax.data.tokenizer import load_tokenizer
  from coma_jax.training.stage1 import gather_positions
  from coma_jax.training.stage1_attention import stage1_attend
  from coma_jax.training.workdir import load_model, read_config

  c = read_config(args.workdir)
  model = load_model(args.workdir)
  tok = load_tokenizer()
  loader = stage1_loader(args.data_dir, model.config, tok, global_batch=c.data.global_batch,
                         buckets=[tuple(b) for b in c.data.buckets], seed=0, split='validation', max_bad_fraction=1.0,
                         num_compression_tokens=c.model.num_compression_tokens, label_mode=c.stage1.label_mode,
                         multi_turn=c.stage1.multi_turn,
                         image=ImageSettings(min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels))

  @jax.jit
  def predict(batch):
    hidden = model.hidden_states(batch['inputs'], stage1_attend(c.stage1.mask, batch))
    return model.logits(gather_positions(hidden, batch['label_positions'])).argmax(-1)

  turns, tokens = collections.Counter(), collections.Counter()
  end = tok.token_to_id('<|im_end|>')
  for _, batch, _ in loader:
    batch = {k: v for k, v in batch.items() if k not in ('labels', 'roles', 'example_ids')}
    guess = np.asarray(predict(batch))
    targets = np.asarray(batch['label_targets'])
    for row in range(targets.shape[0]):
      real = targets[row] >= 0
      start = 0  # a row's labels split into turns at each <|im_end|> (every answer ends with one)
      for i in np.flatnonzero(real & (targets[row] == end)):
        span = slice(start, i + 1)
        kind = kind_of(tok.decode(targets[row][span][:-1].tolist()))
        right = guess[row][span] == targets[row][span]
        turns[kind, 'n'] += 1
        turns[kind, 'exact'] += int(right.all())
        tokens[kind, 'n'] += right.size
        tokens[kind, 'right'] += int(right.sum())
        start = i + 1
  print(f'{args.workdir}: validation records of {args.data_dir}')
  print('| kind | turns | exact (greedy would write it) | token accuracy |\n|---|---|---|---|')
  for kind in ('caption', 'answer'):
    n = turns[kind, 'n']
    if n:
      print(f'| {kind} | {n} | {turns[kind, "exact"] / n:.3f} | {tokens[kind, "right"] / tokens[kind, "n"]:.3f} |')


if __name__ == '__main__':
  main()
