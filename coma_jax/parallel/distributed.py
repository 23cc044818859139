"""JAX's multi-controller runtime (`jax.distributed`), initialised from the environment.

Every launcher (launch/slurm, launch/k8s, launch/tpu, launch/local.py) speaks one contract:

  COMA_COORDINATOR_ADDRESS  host:port of process 0     } explicit: Kubernetes, launch/local.py
  COMA_NUM_PROCESSES        how many processes          }
  COMA_PROCESS_ID           this process, 0..N-1        }
  COMA_LOCAL_DEVICE_IDS     optional: 0,1,... this process's devices (any mode; SLURM with one
                            process per node needs it: jax's SLURM detection assumes one per GPU)
  COMA_DISTRIBUTED          auto: let jax detect the cluster (SLURM under srun, TPU VM pods);
                            off: never initialise
  COMA_HEARTBEAT_TIMEOUT_S  how long a silent process may stay silent before the others fail (100)
  COMA_INIT_TIMEOUT_S       how long start-up waits for every process to join (300)

Without any of these, a SLURM step with several tasks and a multi-host TPU slice are detected
too; a single process initialises nothing. A process that dies makes the others exit non-zero
within about the heartbeat timeout (jax's coordination service stops them) instead of hanging.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os

log = logging.getLogger('coma_jax.distributed')

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = 'COMA_COORDINATOR_ADDRESS', 'COMA_NUM_PROCESSES', 'COMA_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS, ENV_MODE = 'COMA_LOCAL_DEVICE_IDS', 'COMA_DISTRIBUTED'
ENV_HEARTBEAT, ENV_INIT_TIMEOUT = 'COMA_HEARTBEAT_TIMEOUT_S', 'COMA_INIT_TIMEOUT_S'
SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to initialise: `source` says which setting decided it (logged)."""
  source: str
  coordinator_address: str | None = None  # None: jax detects the cluster
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  heartbeat_timeout_s: int = 100
  init_timeout_s: int = 300


def _int(env, name: str, default: int | None = None) -> int | None:
  value = env.get(name)
  if value in (None, ''):
    return default
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r}: expected an integer') from None


def _multi_host_tpu(env) -> bool:
  """A TPU VM slice of several hosts (GKE and queued resources name the workers)."""
  hosts = env.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h.strip()]) > 1


def detect(env=None) -> Spec | None:
  """The initialisation the environment asks for, or None for a single process."""
  env = os.environ if env is None else env
  mode = env.get(ENV_MODE, '').strip().lower()
  if mode not in ('', 'auto', 'off'):
    raise ValueError(f"{ENV_MODE}={env.get(ENV_MODE)!r}: expected 'auto', 'off' or unset")
  if mode == 'off':
    return None
  ids = env.get(ENV_LOCAL_DEVICE_IDS)
  try:
    local = tuple(int(x) for x in ids.split(',')) if ids else None
  except ValueError:
    raise ValueError(f'{ENV_LOCAL_DEVICE_IDS}={ids!r}: expected device numbers like 0,1,2,3') from None
  # Also under auto: jax's SLURM detection otherwise gives each process the one GPU of its task
  # number, which is wrong for one process per node.
  common = dict(local_device_ids=local, heartbeat_timeout_s=_int(env, ENV_HEARTBEAT, 100),
                init_timeout_s=_int(env, ENV_INIT_TIMEOUT, 300))
  explicit = {k: env.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)}
  if any(explicit.values()):
    missing = [k for k, v in explicit.items() if not v]
    if missing:
      raise ValueError(f'{", ".join(missing)} not set: an explicit start needs {ENV_COORDINATOR}, '
                       f'{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} together')
    n, i = _int(env, ENV_NUM_PROCESSES), _int(env, ENV_PROCESS_ID)
    if n < 1 or not 0 <= i < n:
      raise ValueError(f'{ENV_PROCESS_ID}={i} is not in 0..{ENV_NUM_PROCESSES}-1 = {n - 1}')
    if n == 1:
      return None
    return Spec('env', explicit[ENV_COORDINATOR], n, i, **common)
  if mode == 'auto':
    return Spec(f'{ENV_MODE}=auto', **common)
  if all(v in env for v in SLURM_VARS) and _int(env, 'SLURM_NTASKS', 1) > 1:
    return Spec('slurm', **common)
  if _multi_host_tpu(env):
    return Spec('tpu', **common)
  return None


def initialize(spec: Spec | None) -> bool:
  """Starts jax.distributed for `spec` (before anything touches the devices); False if spec is None."""
  if spec is None:
    return False
  import jax
  kw = dict(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
            process_id=spec.process_id, local_device_ids=spec.local_device_ids,
            initialization_timeout=spec.init_timeout_s, heartbeat_timeout_seconds=spec.heartbeat_timeout_s)
  accepted = inspect.signature(jax.distributed.initialize).parameters  # jax 0.10 and 0.11 differ a little
  jax.distributed.initialize(**{k: v for k, v in kw.items() if k in accepted})
  log.info('jax.distributed (%s): process %d of %d, %d local / %d global devices', spec.source,
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def initialize_from_env(env=None) -> bool:
  return initialize(detect(env))


def quiet_unless_first() -> None:
  """Only process 0 logs progress: the others keep warnings and errors."""
  import jax
  if jax.process_index() != 0:
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger('coma_jax').setLevel(logging.WARNING)
