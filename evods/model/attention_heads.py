"""Which key/value heads each part of the query heads attends with, when the heads are cut into equal parts (the
ranks of tensor parallelism; the same arithmetic holds for any split of the heads over ranks).

Under grouped-query attention query head h uses KV head h // (num_heads / num_kv_heads). Part p of `parts` holds the
consecutive query heads [p * num_heads / parts, (p + 1) * num_heads / parts), so:
- when parts divides num_kv_heads, part p holds its own KV heads [p * kv / parts, (p + 1) * kv / parts);
- when num_kv_heads divides parts (fewer KV heads than parts), each part's query heads lie in one KV group, and
  parts / num_kv_heads consecutive parts hold a copy of the same KV head (vLLM replicates KV heads the same way,
  `vllm/model_executor/models/llama.py`); the copies' gradients must be summed over the parts that share them;
- otherwise a part's query heads would straddle two KV groups, which no split of whole KV heads serves.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class HeadSplit:
    num_heads: int
    num_kv_heads: int
    parts: int

    def __post_init__(self):
        problem = self.problem(self.num_heads, self.num_kv_heads, self.parts)
        if problem:
            raise ValueError(problem)

    @staticmethod
    def problem(num_heads: int, num_kv_heads: int, parts: int) -> str | None:
        """Why `num_heads` query heads with `num_kv_heads` KV heads do not split into `parts` parts, in words that name
        the numbers and the part counts that would fit; None when they do."""
        if HeadSplit.fits(num_heads, num_kv_heads, parts):
            return None
        fitting = ", ".join(str(n) for n in range(1, num_heads + 1) if HeadSplit.fits(num_heads, num_kv_heads, n))
        if num_heads % parts:
            return f"{num_heads} query heads do not split into {parts} equal parts (sizes that fit: {fitting})"
        return (f"{num_kv_heads} KV heads do not fit {parts} parts: each part needs whole KV heads of its own (KV "
                f"heads a multiple of {parts}) or one KV head shared with other parts ({parts} a multiple of the KV "
                f"heads) (sizes that fit: {fitting})")

    @staticmethod
    def fits(num_heads: int, num_kv_heads: int, parts: int) -> bool:
        return num_heads % parts == 0 and (num_kv_heads % parts == 0 or parts % num_kv_heads == 0)

    @property
    def kv_replicas(self) -> int:
        """How many consecutive parts hold the same KV heads (1: every part holds its own)."""
        return max(1, self.parts // self.num_kv_heads)

    @property
    def kv_chunks(self) -> int:
        """Into how many distinct chunks the KV heads are cut (parts / kv_replicas)."""
        return self.parts // self.kv_replicas

    @property
    def kv_heads_per_part(self) -> int:
        return max(1, self.num_kv_heads // self.parts)

    def kv_heads(self, part: int) -> range:
        """The KV heads part `part` holds: its chunk of `num_kv_heads / kv_heads_per_part` equal chunks."""
        chunk = part // self.kv_replicas
        return range(chunk * self.kv_heads_per_part, (chunk + 1) * self.kv_heads_per_part)
