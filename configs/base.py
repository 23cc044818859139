"""The CoMa reference recipe (paper + released code), as an ml_collections config.

Use through a model file (coma_3b.py, coma_7b.py, tiny.py): `--config configs/coma_3b.py:stage1`.
Overrides: `--config.optim.learning_rate=1e-4`. Every key is read by the run (a test checks it);
`stage1` / `stage2` hold what only that stage reads.
"""
import ml_collections


def get_config(variant: str = 'stage1') -> ml_collections.ConfigDict:
  if variant not in ('stage1', 'stage2'):
    raise ValueError(f'variant must be stage1 or stage2, got {variant!r}')
  c = ml_collections.ConfigDict()
  c.stage = variant
  c.seed = 0
  c.init_from = ''  # a workdir to start from (stage 2: the stage-1 run); 'DIR', 'DIR:step=N' or 'DIR:best'
  c.model = dict(
      init='pretrained',     # pretrained: from `checkpoint`; random: from `hf_config` (smoke runs)
      checkpoint='',         # a local Qwen2.5-VL-Instruct directory (config.json, safetensors, tokenizer.json)
      hf_config='',          # a config.json (random init and planning)
      num_compression_tokens=32,  # K
      dtype='bfloat16',      # compute
      frozen_dtype='bfloat16',  # frozen base weights: no fp32 master copy, no optimizer state
      scan_layers=True,
      remat='full',          # none | full | save_dots | projections
      attention='auto',      # auto | xla | blockwise | cudnn | splash (model/attention.py)
  )
  c.mesh = dict(shape=(-1, 1, 1), rules=(), frozen_replicated=False)
  c.adapter = dict(kind='dora', rank=16, alpha=64.0, dropout=0.1,
                   targets=('text.q_proj', 'text.k_proj', 'text.v_proj', 'text.o_proj'))
  c.trainable = dict(embeddings='all', vision=False, full=False)
  c.optim = dict(learning_rate=5e-5, warmup_ratio=0.05, weight_decay=0.0, clip_norm=1.0)
  c.train = dict(steps=867)  # optimizer steps; the learning-rate schedule derives from it
  c.checkpoint = dict(every=100, keep=2)  # plus the best by the validation metric
  c.validation = dict(every=100, max_examples=512)  # 0 = off; on checkpoint steps it picks the best
  c.data = dict(
      data_dir='', global_batch=256, examples_per_group=1, num_workers=4,
      on_bad_record='skip',  # or 'error': stop at the first bad record, naming it
      max_bad_fraction=0.05,  # stop when more of the records read are bad (e.g. a wrong image root)
      min_pixels=28 * 28 * 256, max_pixels=28 * 28 * 1024,
      # Unpacked (one example per row; validation always): (seq_len, vision_slots, label_slots):
      # 256-1024 visual tokens, up to 8192 tokens.
      buckets=((2048, 4608, 1024), (4096, 4608, 2048), (8192, 9216, 4096)),
      # Packing (data/packing.py, docs/packing.md): several examples per row, the step's examples
      # packed first fit decreasing into the smallest bucket (rows over all processes, seq_len,
      # vision_slots per row, label_slots per row) that holds them. On an H100 (3B, mixed lengths,
      # cuDNN's packed layout) packed steps ran 1.36x (stage 1) and 1.58x (stage 2) the examples/s.
      # `--config.data.packing=False --config.stage1.micro_batches=32` turns it off.
      packing=True,
      packed_buckets=((32, 6144, 21504, 3072), (32, 7168, 25088, 3584), (32, 8192, 28672, 4096)),
      max_per_row=16,  # sequences per packed row
  )
  if variant == 'stage1':
    # micro_batches: 4 packed micro-batches of 8 rows of <= 8192 tokens; unpacked (data.packing=False)
    # the 256 examples need 32 micro-batches of 8 rows to hold the same tokens per micro-batch.
    c.stage1 = dict(mask='paper', label_mode='answers', multi_turn=True, normalisation='example_mean',
                    micro_batches=4, loss_chunk=512,
                    label_budget=0)  # LM-head positions per micro-batch; 0: every label slot (stage1.py)
  else:
    c.train.steps = 1500
    c.data.global_batch = 1024
    c.data.buckets = ((1024, 4608, 0), (2048, 4608, 0))
    # All sides together: 2 x 1024 sequences of ~100-1000 tokens; 512 rows for hard negatives.
    c.data.packed_buckets = ((384, 1792, 7168, 0), (384, 2048, 8192, 0), (512, 2048, 8192, 0), (512, 2304, 9216, 0))
    c.stage2 = dict(temperature=0.03, bidirectional=False, hard_negatives=False,
                    chunks=16,  # GradCache chunks of the global batch (1 = no GradCache)
                    reuse_frozen_vision=True,
                    require_init_from=True)  # the recipe starts from a stage-1 workdir
    c.data.block_size = 64  # the stage-2 sampler's block: consecutive examples from one subset
    c.data.subset_caps = 'reference'  # examples used per MMEB-train subset: 'reference' caps or '' (all)
  return c
