#!/usr/bin/env python3
"""N JAX processes on this machine, each with D fake CPU devices, through the same environment
contract as the pod launchers (coma_jax/parallel/distributed.py):

  python launch/local.py -n 2 [--devices_per_process 4] [--dry-run] -- -m coma_jax.train \\
      --config configs/tiny.py:stage2 --workdir W

Each process runs `python <args>` in its own process group, with its output prefixed by
`[process i]`. SIGTERM or Ctrl-C here is passed to every group (grain workers included), as a
pod's preemption would be. The exit status is the first non-zero one of the processes, else 0.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(index: int, count: int, devices: int, port: int, base=None) -> dict:
  """The environment of process `index`: the launchers' contract plus fake CPU devices."""
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device_count')]
  env.update({
      'COMA_COORDINATOR_ADDRESS': f'localhost:{port}', 'COMA_NUM_PROCESSES': str(count),
      'COMA_PROCESS_ID': str(index), 'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}']),
      'PYTHONPATH': os.pathsep.join(filter(None, [ROOT, env.get('PYTHONPATH')])),
  })
  return env


def _pump(stream, prefix: str) -> None:
  for line in iter(stream.readline, ''):
    sys.stdout.write(f'{prefix} {line}')
    sys.stdout.flush()


def launch(args: list[str], count: int, devices: int, port: int | None = None) -> int:
  port = port or free_port()
  procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, env=process_env(i, count, devices, port),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
           for i in range(count)]
  pumps = [threading.Thread(target=_pump, args=(p.stdout, f'[process {i}]'), daemon=True)
           for i, p in enumerate(procs)]
  for t in pumps:
    t.start()

  def forward(signum, frame):
    for p in procs:
      try:
        os.killpg(p.pid, signum)
      except ProcessLookupError:
        pass
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    codes = [p.wait() for p in procs]
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for t in pumps:
    t.join(timeout=5)
  for i, code in enumerate(codes):
    if code:
      print(f'[launch] process {i} exited with status {code}', file=sys.stderr)
  return next((c for c in codes if c), 0)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if '--' not in argv:
    print('usage: launch/local.py -n N [--devices_per_process D] [--dry-run] -- <python args>', file=sys.stderr)
    return 2
  split = argv.index('--')
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('-n', '--num_processes', type=int, required=True)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('--port', type=int, default=None, help='the coordinator port (default: a free one)')
  parser.add_argument('--dry-run', action='store_true', help='print the processes it would start')
  opts = parser.parse_args(argv[:split])
  args = argv[split + 1:]
  if opts.num_processes < 1 or opts.devices_per_process < 1 or not args:
    parser.error('needs -n >= 1, --devices_per_process >= 1 and python arguments after --')
  if opts.dry_run:
    port = opts.port or 12355
    for i in range(opts.num_processes):
      env = process_env(i, opts.num_processes, opts.devices_per_process, port, base={})
      shown = ' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items() if k != 'PYTHONPATH')
      print(f'{shown} python {shlex.join(args)}')
    return 0
  return launch(args, opts.num_processes, opts.devices_per_process, opts.port)


if __name__ == '__main__':
  sys.exit(main())
