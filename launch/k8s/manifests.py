"""YAML text of the training manifests, from string templates (no YAML library): N pods of an
indexed Job, named either by a JobSet or by a plain Job's headless Service. Every value from the
user is written with `json.dumps`, and a JSON string is a valid YAML scalar."""
from __future__ import annotations

import dataclasses
import json
import re
import textwrap

PORT = 12355  # the jax.distributed coordinator, on process 0
REPLICATED_JOB = 'worker'
RUN_LABEL = 'coma-jax/run'
WORKDIR_MOUNT = '/workdir'
COMPLETION_INDEX_ANNOTATION = 'batch.kubernetes.io/job-completion-index'
# The XLA flags and memory share of launch/slurm/train.sbatch, which says what each one does.
XLA_FLAGS = ' '.join([
    '--xla_gpu_enable_latency_hiding_scheduler=true',
    '--xla_gpu_enable_triton_gemm=false',
    '--xla_gpu_enable_command_buffer=',
    '--xla_gpu_all_reduce_combine_threshold_bytes=134217728',
    '--xla_gpu_all_gather_combine_threshold_bytes=134217728',
    '--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728',
    '--xla_gpu_enable_pipelined_all_gather=true',
    '--xla_gpu_enable_pipelined_reduce_scatter=true',
    '--xla_gpu_enable_pipelined_all_reduce=true',
    '--xla_gpu_enable_while_loop_double_buffering=true',
])
# The process id is the pod's completion index; `exec "$@"` then runs `args` as given (unparsed).
ENTRYPOINT = ['/bin/sh', '-c',
              'export COMA_PROCESS_ID="${JOB_COMPLETION_INDEX:?not a pod of an Indexed Job}"; exec "$@"',
              'coma-train']
CONTRACT_ENV = ('COMA_COORDINATOR_ADDRESS', 'COMA_NUM_PROCESSES', 'COMA_PROCESS_ID', 'JOB_COMPLETION_INDEX')
_DNS_LABEL = re.compile(r'[a-z]([-a-z0-9]*[a-z0-9])?')


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  nodes: int
  gpus_per_node: int
  image: str
  config: str
  workdir: str
  pvc: str | None = None
  train_args: tuple[str, ...] = ()
  env: tuple[tuple[str, str], ...] = ()  # extra container env, after the defaults
  max_restarts: int = 0  # JobSet only: restarts of the whole set, which resumes from its checkpoint


def pod_hostname(run: Run, kind: str, index: int) -> str:
  """The stable DNS label of pod `index`: Indexed Job pods are named <job>-<index>."""
  job = f'{run.name}-{REPLICATED_JOB}-0' if kind == 'jobset' else run.name
  return f'{job}-{index}'


def coordinator_address(run: Run, kind: str) -> str:
  # Both kinds publish the pods under a headless service named like the run.
  return f'{pod_hostname(run, kind, 0)}.{run.name}:{PORT}'


def check(run: Run, kind: str) -> None:
  """Raises ValueError for a run Kubernetes would refuse, or whose pods could not find each other."""
  if not _DNS_LABEL.fullmatch(run.name):
    raise ValueError(f'name {run.name!r}: lower-case letters, digits and -, starting with a letter')
  longest = pod_hostname(run, kind, run.nodes - 1)
  if len(longest) > 63:
    raise ValueError(f'name {run.name!r} is too long: pod hostname {longest!r} exceeds 63 characters')
  if run.nodes < 1 or run.gpus_per_node < 1:
    raise ValueError('--nodes and --gpus_per_node must be at least 1')
  if '://' not in run.workdir and not (run.pvc and (run.workdir + '/').startswith(WORKDIR_MOUNT + '/')):
    raise ValueError(f'workdir {run.workdir!r} must be where every pod sees it: a bucket path '
                     f'(gs://, s3://) or, with --pvc, a path under {WORKDIR_MOUNT}')
  clashes = sorted({k for k, _ in run.env} & set(CONTRACT_ENV))
  if clashes:
    raise ValueError(f'--env may not set {", ".join(clashes)}: the manifest sets them')


def _q(value) -> str:
  return json.dumps(value)


def _indent(text: str, spaces: int = 2) -> str:
  return textwrap.indent(text, ' ' * spaces)


def _item(block: str) -> str:
  """`block` (a mapping) as one item of a YAML list."""
  return '- ' + _indent(block)[2:]


def _strings(values) -> str:
  return ''.join(f'- {_q(v)}\n' for v in values)


def _container_env(run: Run, kind: str) -> str:
  env = {
      'COMA_COORDINATOR_ADDRESS': coordinator_address(run, kind),
      'COMA_NUM_PROCESSES': str(run.nodes),
      # All of the pod's GPUs belong to its one process, whatever cluster jax might detect.
      'COMA_LOCAL_DEVICE_IDS': ','.join(str(i) for i in range(run.gpus_per_node)),
      'XLA_FLAGS': XLA_FLAGS,
      'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.9',
      'NCCL_DEBUG': 'WARN',
  }
  env.update(dict(run.env))
  index_from_annotation = (
      '- name: JOB_COMPLETION_INDEX\n'
      '  valueFrom:\n'
      '    fieldRef:\n'
      f'      fieldPath: {_q(f"metadata.annotations[{COMPLETION_INDEX_ANNOTATION!r}]")}\n')
  return index_from_annotation + ''.join(f'- name: {_q(k)}\n  value: {_q(v)}\n' for k, v in env.items())


def _k8s_literal(arg: str) -> str:
  # Kubernetes expands $(VAR) in args; $$( keeps a literal $( .
  return arg.replace('$(', '$$(')


def pod_template(run: Run, kind: str) -> str:
  args = ['python', '-m', 'coma_jax.train', '--config', run.config, '--workdir', run.workdir,
          *run.train_args]
  mounts = '- name: dshm\n  mountPath: /dev/shm\n'
  volumes = '- name: dshm\n  emptyDir:\n    medium: Memory\n'
  if run.pvc:
    mounts += f'- name: workdir\n  mountPath: {_q(WORKDIR_MOUNT)}\n'
    volumes += f'- name: workdir\n  persistentVolumeClaim:\n    claimName: {_q(run.pvc)}\n'
  container = (
      'name: train\n'
      f'image: {_q(run.image)}\n'
      f'command:\n{_indent(_strings(ENTRYPOINT))}'
      f'args:\n{_indent(_strings(_k8s_literal(a) for a in args))}'
      f'env:\n{_indent(_container_env(run, kind))}'
      'ports:\n'
      '  - name: coordinator\n'
      f'    containerPort: {PORT}\n'
      'resources:\n'
      '  limits:\n'
      f'    nvidia.com/gpu: {run.gpus_per_node}\n'
      f'volumeMounts:\n{_indent(mounts)}')
  # A plain Job's pods join the headless Service by subdomain; JobSet sets it itself.
  subdomain = f'  subdomain: {_q(run.name)}\n' if kind == 'job' else ''
  return ('metadata:\n'
          '  labels:\n'
          f'    {RUN_LABEL}: {_q(run.name)}\n'
          'spec:\n'
          '  restartPolicy: Never\n'
          f'{subdomain}'
          f'  containers:\n{_indent(_item(container), 4)}'
          f'  volumes:\n{_indent(_indent(volumes))}')


def job_spec(run: Run, kind: str) -> str:
  # One pod per node; any pod failing fails the Job (the others would wait on it forever).
  return ('completionMode: Indexed\n'
          f'completions: {run.nodes}\n'
          f'parallelism: {run.nodes}\n'
          'backoffLimit: 0\n'
          f'template:\n{_indent(pod_template(run, kind))}')


def _metadata(run: Run) -> str:
  return f'metadata:\n  name: {_q(run.name)}\n  labels:\n    {RUN_LABEL}: {_q(run.name)}\n'


def jobset(run: Run) -> str:
  return ('apiVersion: jobset.x-k8s.io/v1alpha2\n'
          'kind: JobSet\n'
          f'{_metadata(run)}'
          'spec:\n'
          '  failurePolicy:\n'
          f'    maxRestarts: {run.max_restarts}\n'
          '  network:\n'
          '    enableDNSHostnames: true\n'
          '    publishNotReadyAddresses: true\n'
          '  replicatedJobs:\n'
          f'    - name: {REPLICATED_JOB}\n'
          '      replicas: 1\n'
          '      template:\n'
          '        spec:\n'
          f'{_indent(job_spec(run, "jobset"), 10)}')


def indexed_job(run: Run) -> str:
  return ('apiVersion: batch/v1\n'
          'kind: Job\n'
          f'{_metadata(run)}'
          'spec:\n'
          f'{_indent(job_spec(run, "job"))}')


def headless_service(run: Run) -> str:
  # DNS records for the pods before they are ready: process 0 must be found while all start up.
  return ('apiVersion: v1\n'
          'kind: Service\n'
          f'{_metadata(run)}'
          'spec:\n'
          '  clusterIP: None\n'
          '  publishNotReadyAddresses: true\n'
          '  selector:\n'
          f'    {RUN_LABEL}: {_q(run.name)}\n'
          '  ports:\n'
          '    - name: coordinator\n'
          f'      port: {PORT}\n')


def render(run: Run, kind: str) -> str:
  """The manifest text for `kind`: 'jobset', or 'job' (an indexed Job and its headless Service)."""
  check(run, kind)
  if kind == 'jobset':
    return jobset(run)
  if kind == 'job':
    return headless_service(run) + '---\n' + indexed_job(run)
  raise ValueError(f'kind {kind!r}: expected jobset or job')
