"""One FLOPs definition, shared by the planner, the training metrics and the benchmarks.

Model FLOPs (for MFU) count the work the method needs, 2 FLOPs per multiply-add:
  - weights that train: 6 * N * T (forward, input gradient, weight gradient);
  - frozen weights under adapters (the gradient still flows through them): 4 * N * T;
  - a frozen tower that only runs forward (the vision tower when frozen): 2 * N * T;
  - attention scores and values: 4 * L^2 * H * d / 2 per layer and sequence forward (causal
    halves it), x3 with a backward pass; the stage-1 paper mask runs two calls;
  - the LM head at the supervised positions (stage 1 only; stage 2 never runs it).
No recompute and no GradCache first pass. Executed FLOPs (for HFU) add what actually runs: the
recompute of full remat and the first, gradient-free pass of GradCache.
Both are divided by the device's peak bf16 dense FLOP/s; `None` where the peak is unknown (CPU).
"""
from __future__ import annotations

import dataclasses

import jax

# Peak dense bf16 FLOP/s per device, from the vendors' data sheets (no sparsity).
PEAK_BF16 = {
    'H100': 989e12, 'H200': 989e12, 'H800': 989e12, 'A100': 312e12, 'A800': 312e12, 'L40S': 362e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v6 lite': 918e12,
}


def device_peak_flops(device=None) -> float | None:
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return None
  kind = getattr(device, 'device_kind', '')
  for name, peak in PEAK_BF16.items():
    if name.lower() in kind.lower():
      return peak
  return None


@dataclasses.dataclass(frozen=True)
class StepFlops:
  model: float     # what the method needs (MFU)
  executed: float  # what runs, recompute and GradCache's first pass included (HFU)


def _text_params(t) -> int:
  attn = t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim \
      + t.num_attention_heads * t.head_dim * t.hidden_size
  return t.num_hidden_layers * (attn + 3 * t.hidden_size * t.intermediate_size)


def _vision_params(v) -> int:
  merger = (v.hidden_size * v.merge_unit) ** 2 + v.hidden_size * v.merge_unit * v.out_hidden_size
  return v.depth * (4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size) + v.patch_dim * v.hidden_size + merger


def _attention(t, sequences: int, length: int) -> float:
  return 4 * t.num_hidden_layers * sequences * length**2 * t.num_attention_heads * t.head_dim / 2


def step_flops(model_config, *, sequences: int, length: int, vision_patches: int, label_positions: int = 0,
               llm_trains: bool = False, vision_trains: bool = False, paper_mask: bool = False,
               full_remat: bool = False, grad_cache: bool = False, reused_vision: bool = False) -> StepFlops:
  """FLOPs of one step over `sequences` rows of `length` tokens with `vision_patches` patches in
  all. `llm_trains`: the LLM's weights themselves train (full fine-tuning); with adapters the
  LLM is frozen but back-propagated through. `reused_vision`: GradCache's second pass reuses a
  frozen tower's first-pass output (no second vision forward)."""
  t, v = model_config.text, model_config.vision
  tokens = sequences * length
  text = 2 * _text_params(t) * tokens
  attn = _attention(t, sequences, length) * (2 if paper_mask else 1)
  vision = 2 * _vision_params(v) * vision_patches
  head = 2 * t.hidden_size * t.vocab_size * label_positions
  llm = 3 * text if llm_trains else 2 * text
  model = llm + 3 * attn + (3 * vision if vision_trains else vision) + 3 * head
  executed = model
  if full_remat:
    executed += text + attn + (vision if vision_trains else 0)
  if grad_cache:
    executed += text + attn + (0 if reused_vision else vision)
  return StepFlops(model=model, executed=executed)


def batch_flops(model_config, sides, *, processes: int = 1, **options) -> StepFlops:
  """`step_flops` of one step over collated sides (a stage-1 batch is one side; each stage-2 side
  at its own length), `processes` of them alike. Padded tokens, patches and label slots count: they
  are computed (the padding waste is its own metric). `options`: step_flops' flags."""
  model = executed = 0.0
  for side in sides:
    ids, pixels = side['inputs'].input_ids, side['inputs'].pixel_patches
    rows = ids.shape[0] * processes
    f = step_flops(model_config, sequences=rows, length=ids.shape[1],
                   vision_patches=0 if pixels is None else pixels.shape[0] * pixels.shape[1] * processes,
                   label_positions=rows * side['label_positions'].shape[1] if 'label_positions' in side else 0,
                   **options)
    model, executed = model + f.model, executed + f.executed
  return StepFlops(model=model, executed=executed)
