"""Export a trained run as a transformers Qwen2.5-VL directory:

  python -m coma_jax.export --checkpoint WORKDIR [--step N | --best] --out DIR [--dtype bfloat16] [--peft]

DIR holds the model (adapters merged exactly, the trained embedding rows), the tokenizer with the
compression tokens, preprocessor_config.json, coma_embedding.json and a README whose PyTorch
snippet computes the embedding. --peft writes DIR/base (the model the run started from) and
DIR/adapter (the run's adapter, PEFT format) instead of the merged weights. On several hosts every
process runs the command and process 0 writes. See coma_jax/hf/export_dir.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='a coma_jax workdir')
  which = parser.add_mutually_exclusive_group()
  which.add_argument('--step', type=int, default=None, help='this checkpoint step (default: the latest)')
  which.add_argument('--best', action='store_true', help='the best checkpoint by the validation metric')
  parser.add_argument('--out', required=True, help='the directory to write (new or empty)')
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default=None,
                      help="the stored dtype (default: the run's compute dtype)")
  parser.add_argument('--peft', action='store_true', help='DIR/base + DIR/adapter (PEFT) instead of merged weights')
  args = parser.parse_args(argv)
  from coma_jax.parallel.distributed import initialize_from_env
  initialize_from_env()  # launched on several hosts (launch/): one process each
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')  # orbax's INFO is noise here
  from coma_jax.hf.export_dir import export
  try:
    summary = export(args.checkpoint, args.out, step=args.step, best=args.best, dtype=args.dtype, peft=args.peft)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(json.dumps(summary))
  return 0


if __name__ == '__main__':
  sys.exit(main())
