"""Randomness inside the tensor-parallel region.

Randomness on activations every tensor rank holds whole (the residual stream) must agree across tensor ranks;
randomness on a rank's own shard (e.g. dropout on its local attention heads) must differ, or the heads of different
ranks would share one mask. The InternLM model has no dropout today, so nothing draws from this generator yet; a
module that adds dropout inside a tensor-parallel layer takes its generator from here.
"""
import torch

from .layout import ParallelLayout

# Megatron's offset, so the tensor-region stream never coincides with the default stream seeded from `seed`.
TENSOR_REGION_SEED_OFFSET = 2718


def tensor_parallel_generator(seed: int, tp_rank: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded differently on each tensor rank and identically across data/pipeline replicas of it."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + TENSOR_REGION_SEED_OFFSET + tp_rank)
    return generator


def parallel_seeds(seed: int, layout: ParallelLayout) -> dict[str, int]:
    """InternEvo's seed per parallel mode (ParallelContext.set_seed): DATA is `seed` on every rank, TENSOR differs
    per tensor rank and pipeline stage. Training draws from torch's generator seeded with TENSOR once the model is
    built, so dropout masks differ where they must; the initial weights come from `seed` alone."""
    return {"DATA": seed, "TENSOR": seed + layout.tp_rank + layout.pp_rank * 1024}
