"""The reference's two-pass GradCache step in torch, shared by the torch baselines of
step_throughput.py and gpu_step.py."""
from __future__ import annotations


def two_pass_step(encode, chunk_rows, opt, temperature: float = 0.03, device=None) -> float:
  """One optimizer step: every representation without gradients (chunk by chunk), the InfoNCE
  loss's gradient with respect to them, then a chunked forward with grad and `backward(rep_grad)`.
  `encode(side, rows)` -> (len(rows), D) unit vectors; `chunk_rows`: the rows of each chunk."""
  import torch
  import torch.nn.functional as F
  opt.zero_grad(set_to_none=True)
  with torch.no_grad():
    reps = {s: torch.cat([encode(s, rows) for rows in chunk_rows]) for s in ('query', 'positive')}
  leaves = {s: r.detach().requires_grad_(True) for s, r in reps.items()}
  n = leaves['query'].shape[0]
  loss = F.cross_entropy(leaves['query'] @ leaves['positive'].T / temperature, torch.arange(n, device=device))
  loss.backward()
  for s in ('query', 'positive'):
    start = 0  # representations were concatenated in chunk order
    for rows in chunk_rows:
      encode(s, rows).backward(leaves[s].grad[start:start + len(rows)])
      start += len(rows)
  opt.step()
  return loss.item()
