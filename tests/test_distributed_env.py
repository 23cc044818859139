"""The launchers' env contract, read by coma_jax/parallel/distributed.py (no processes started)."""
import pytest

from coma_jax.parallel.distributed import Spec, detect

SLURM = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-4]', 'SLURM_NTASKS': '4', 'SLURM_PROCID': '2',
         'SLURM_LOCALID': '0'}
EXPLICIT = {'COMA_COORDINATOR_ADDRESS': 'job-0.job:12355', 'COMA_NUM_PROCESSES': '4', 'COMA_PROCESS_ID': '3'}


@pytest.mark.parametrize('env, expected', [
    ({}, None),  # one process: nothing to initialise
    ({**SLURM, 'SLURM_NTASKS': '1'}, None),
    ({**EXPLICIT, 'COMA_NUM_PROCESSES': '1', 'COMA_PROCESS_ID': '0'}, None),
    ({'COMA_DISTRIBUTED': 'off', **EXPLICIT}, None),
    (EXPLICIT, Spec('env', 'job-0.job:12355', 4, 3)),
    ({**EXPLICIT, 'COMA_LOCAL_DEVICE_IDS': '0,1', 'COMA_HEARTBEAT_TIMEOUT_S': '5'},
     Spec('env', 'job-0.job:12355', 4, 3, (0, 1), heartbeat_timeout_s=5)),
    (SLURM, Spec('slurm')),
    ({**SLURM, 'COMA_LOCAL_DEVICE_IDS': '0,1,2,3,4,5,6,7'}, Spec('slurm', local_device_ids=tuple(range(8)))),
    ({'COMA_DISTRIBUTED': 'auto', 'COMA_INIT_TIMEOUT_S': '60'}, Spec('COMA_DISTRIBUTED=auto', init_timeout_s=60)),
    ({'TPU_WORKER_HOSTNAMES': 'w-0,w-1,w-2,w-3'}, Spec('tpu')),
    ({'TPU_WORKER_HOSTNAMES': 'w-0'}, None),  # a single-host slice
])
def test_the_environment_decides(env, expected):
  assert detect(env) == expected


@pytest.mark.parametrize('env, message', [
    ({'COMA_COORDINATOR_ADDRESS': 'h:1', 'COMA_NUM_PROCESSES': '2'}, 'COMA_PROCESS_ID not set'),
    ({**EXPLICIT, 'COMA_PROCESS_ID': '4'}, 'not in 0..'),
    ({**EXPLICIT, 'COMA_NUM_PROCESSES': 'two'}, "COMA_NUM_PROCESSES='two': expected an integer"),
    ({'COMA_DISTRIBUTED': 'yes'}, "expected 'auto', 'off'"),
    ({**EXPLICIT, 'COMA_LOCAL_DEVICE_IDS': 'gpu0'}, 'expected device numbers'),
])
def test_a_bad_setting_is_named(env, message):
  with pytest.raises(ValueError, match=message):
    detect(env)
