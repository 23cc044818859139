"""Train CoMa: `python -m coma_jax.train --config configs/<file>.py[:variant] --workdir DIR`.

  [--config.a.b=value ...]   overrides (ml_collections)
  --profile_steps=A,B        a JAX profiler trace of steps A..B in DIR/profile/
  --coordinator_address=H:P --num_processes=N --process_id=I   an explicit multi-process start

Rerunning the same command resumes from the newest checkpoint in DIR; SIGTERM saves and exits 0.
Several processes (one per host): the launchers in launch/ set the environment that
coma_jax/parallel/distributed.py reads; every process runs this same command.
"""
from __future__ import annotations

import logging
import os
import sys


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file('config', None, 'config file[:variant]', lock_config=True)
  flags.DEFINE_string('workdir', None, 'the run folder (created; resumed when it holds checkpoints)')
  flags.DEFINE_string('profile_steps', '', 'A,B: trace steps A..B with the JAX profiler')
  # Explicit multi-process start (else the launchers' environment decides: parallel/distributed.py).
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (COMA_COORDINATOR_ADDRESS)')
  flags.DEFINE_integer('num_processes', None, 'how many processes (COMA_NUM_PROCESSES)')
  flags.DEFINE_integer('process_id', None, "this process's rank (COMA_PROCESS_ID)")
  flags.mark_flags_as_required(['config', 'workdir'])

  def run(_):
    from coma_jax.parallel import distributed
    from coma_jax.runtime import enable_compilation_cache
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    f = flags.FLAGS  # flags override the environment
    given = {distributed.ENV_COORDINATOR: f.coordinator_address, distributed.ENV_NUM_PROCESSES: f.num_processes,
             distributed.ENV_PROCESS_ID: f.process_id}
    env = dict(os.environ, **{k: str(v) for k, v in given.items() if v is not None})
    distributed.initialize_from_env(env)  # several processes (launch/): before anything touches a device
    distributed.quiet_unless_first()
    from coma_jax.training.loop import train
    enable_compilation_cache()  # a resumed run reuses the compiled steps
    profile = None
    if flags.FLAGS.profile_steps:
      a, b = (int(x) for x in flags.FLAGS.profile_steps.split(','))
      profile = (a, b)
    return train(config.value, flags.FLAGS.workdir, profile)

  app.run(run, argv=argv if argv is not None else sys.argv)


if __name__ == '__main__':
  main()
