#!/usr/bin/env python3
"""Training on N GPU pods of Kubernetes, one process per pod, through the env contract of
coma_jax/parallel/distributed.py. Renders a JobSet (`--kind jobset`, needs the JobSet controller)
or an indexed Job plus a headless Service (`--kind job`, plain Kubernetes), then applies it:

  python launch/k8s/render.py --kind jobset --name coma-s1 --nodes 4 --image REGISTRY/coma_jax:TAG \\
      --config configs/coma_7b.py:stage1 --workdir /workdir/coma-s1 --pvc coma-runs \\
      [--dry-run] [-- extra train args]

--dry-run prints the YAML instead of piping it to `kubectl apply -f -`. The workdir is a bucket path
or, with --pvc, a path in that PersistentVolumeClaim (mounted at /workdir on every pod).
Build the image with launch/k8s/Dockerfile. Standard library only.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

import manifests


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--kind', choices=('jobset', 'job'), default='jobset')
  parser.add_argument('--name', required=True, help='the run: names the Job(Set), its Service and pods')
  parser.add_argument('--nodes', type=int, required=True, help='pods, one training process each')
  parser.add_argument('--gpus_per_node', type=int, default=8)
  parser.add_argument('--image', required=True, help='built from launch/k8s/Dockerfile')
  parser.add_argument('--config', required=True, help='e.g. configs/coma_7b.py:stage1')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--pvc', help=f'PersistentVolumeClaim mounted at {manifests.WORKDIR_MOUNT}')
  parser.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                      help='extra container env, e.g. NCCL_SOCKET_IFNAME=eth0 (repeatable)')
  parser.add_argument('--max_restarts', type=int, default=0,
                      help='JobSet: restarts of all pods after a failure (each resumes from its checkpoint)')
  parser.add_argument('--dry-run', action='store_true', help='print the YAML, apply nothing')
  parser.add_argument('train_args', nargs='*', help='after --: more `python -m coma_jax.train` args')
  args = parser.parse_args(argv)
  if any('=' not in e for e in args.env):
    parser.error('--env takes KEY=VALUE')
  return args


def run_from(args: argparse.Namespace) -> manifests.Run:
  return manifests.Run(
      name=args.name, nodes=args.nodes, gpus_per_node=args.gpus_per_node, image=args.image,
      config=args.config, workdir=args.workdir, pvc=args.pvc, train_args=tuple(args.train_args),
      env=tuple(tuple(e.split('=', 1)) for e in args.env), max_restarts=args.max_restarts)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  try:
    text = manifests.render(run_from(args), args.kind)
  except ValueError as e:
    print(f'render.py: {e}', file=sys.stderr)
    return 2
  if args.dry_run:
    sys.stdout.write(text)
    return 0
  try:
    return subprocess.run(['kubectl', 'apply', '-f', '-'], input=text, text=True).returncode
  except FileNotFoundError:
    print('render.py: kubectl not found (--dry-run prints the manifest)', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
