"""Stage-1 data generation: sample images, ask questions about them, answer them turn by turn.

  python -m coma_jax.datagen sample --input_dir MMEB-train --image_root IMAGES --output images.jsonl
  python -m coma_jax.datagen questions --input images.jsonl --image_root IMAGES --output questions.jsonl \\
      --backend openai --base_url http://localhost:8000/v1 --model Qwen2.5-VL-7B-Instruct
  python -m coma_jax.datagen answers --input questions.jsonl --image_root IMAGES --output qa_generation.jsonl \\
      --backend jax --model Qwen2.5-VL-7B-Instruct --dtype bfloat16
  python -m coma_jax.datagen captions --input images.jsonl --image_root IMAGES --output captions.jsonl ...
  python -m coma_jax.data.build_tfds convert_qa --input qa_generation.jsonl --output qa.jsonl

`answers` and `captions` write the reference's QA-generation format (`{id, image, message}`), which
`convert_qa` turns into the LLaVA JSONL that `build_tfds stage1_qa` reads. Every stage is
resumable: a rerun skips the ids in its output and in `<output>.failures.jsonl`. On a pod, run one
process per host with `--shard K/N` and its own `--output` (the jax back-end uses that host's
devices), then concatenate the outputs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from coma_jax.data.qa_pipeline import stages
from coma_jax.data.qa_pipeline.prompts import QUESTION_TEMPERATURE
from coma_jax.data.qa_pipeline.sample import PER_SUBSET, REFERENCE_SUBSETS, SEED, sample_images


def _backend(args):
  from coma_jax.data.image import ImageSettings
  image = ImageSettings(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
  if args.backend == 'openai':
    from coma_jax.data.qa_pipeline.backends import OpenAIBackend
    if not args.base_url:
      raise ValueError('--backend openai needs --base_url (e.g. http://localhost:8000/v1)')
    return OpenAIBackend(args.base_url, args.model, api_key=args.api_key or os.environ.get('OPENAI_API_KEY'),
                         concurrency=args.concurrency, timeout_s=args.timeout_s, retries=args.retries,
                         backoff_s=args.backoff_s, image=image)
  from coma_jax.data.qa_pipeline.backends import JaxBackend
  from coma_jax.generate.generator import Generator
  generator = Generator.load(args.model, dtype=args.dtype, mesh_shape=tuple(int(x) for x in args.mesh_shape.split(',')),
                             max_new_tokens=args.max_tokens, batch_size=args.batch_size, image=image)
  return JaxBackend(generator)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='stage', required=True)
  sample = sub.add_parser('sample', help='unique image paths of chosen MMEB-train subsets')
  sample.add_argument('--input_dir', required=True, help='MMEB-train: one folder (or file) per subset')
  sample.add_argument('--image_root', required=True)
  sample.add_argument('--output', required=True)
  sample.add_argument('--subsets', default=','.join(REFERENCE_SUBSETS))
  sample.add_argument('--per_subset', type=int, default=PER_SUBSET)
  sample.add_argument('--seed', type=int, default=SEED)
  sample.add_argument('--split_prefix', default='')
  for name, help_ in (('questions', '3-5 retrieval-oriented questions per image'),
                      ('answers', 'multi-turn answers to the questions'),
                      ('captions', 'a short caption per image (single turn)')):
    p = sub.add_parser(name, help=help_)
    p.add_argument('--input', required=True)
    p.add_argument('--image_root', required=True)
    p.add_argument('--output', required=True)
    p.add_argument('--backend', choices=['openai', 'jax'], required=True)
    p.add_argument('--model', required=True, help='openai: the served model name; jax: a local model directory')
    p.add_argument('--base_url', help='openai: e.g. http://localhost:8000/v1')
    p.add_argument('--api_key', help='openai: default $OPENAI_API_KEY')
    p.add_argument('--concurrency', type=int, default=8, help='openai: requests in flight')
    p.add_argument('--timeout_s', type=float, default=120.0)
    p.add_argument('--retries', type=int, default=3, help='openai: retries of a transient failure, with backoff')
    p.add_argument('--backoff_s', type=float, default=1.0)
    p.add_argument('--max_passes', type=int, default=2, help='retry passes over items that still failed')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--temperature', type=float, default=QUESTION_TEMPERATURE)
    p.add_argument('--top_p', type=float, default=1.0)
    p.add_argument('--max_tokens', type=int, default=512)
    p.add_argument('--batch_size', type=int, default=16, help='jax: rows per generation batch')
    p.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'], help='jax')
    p.add_argument('--mesh_shape', default='-1,1,1', help='jax: data,fsdp,tensor')
    p.add_argument('--min_pixels', type=int, default=28 * 28 * 256)
    p.add_argument('--max_pixels', type=int, default=28 * 28 * 1024)
    p.add_argument('--shard', default='0/1', help='K/N: this process takes every N-th input record from the K-th')
    p.add_argument('--no_progress', action='store_true')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  try:
    if args.stage == 'sample':
      records = sample_images(args.input_dir, args.image_root, [s for s in args.subsets.split(',') if s],
                              seed=args.seed, per_subset=args.per_subset, split_prefix=args.split_prefix)
      tmp = args.output + '.tmp'
      with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
      os.replace(tmp, args.output)
      print(f'wrote {len(records)} images to {args.output}')
      return 0
    records = stages.take_shard(stages.read_records(args.input), args.shard)
    options = stages.StageOptions(image_root=args.image_root, seed=args.seed, temperature=args.temperature,
                                  top_p=args.top_p, max_tokens=args.max_tokens, max_passes=args.max_passes,
                                  progress=not args.no_progress)
    work = {'questions': stages.ask_questions, 'answers': stages.answer_questions,
            'captions': stages.write_captions}[args.stage]
    summary = stages.run_stage(records, args.output, work, _backend(args), options, args.stage)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(json.dumps(summary))
  return 0


if __name__ == '__main__':
  sys.exit(main())
