"""Which packs each data-parallel rank reads at each step (§3.5), and which steps to skip.

StaticBatchSampler follows InternEvo's: a pass shuffles all pack indices with RandomState(1024) (the RNG continues
from pass to pass), keeps a multiple of micro_num * dp_size, and rank r reads indices[r::dp_size] in steps of the
current batch size (micro_num, or less during ramp-up). Tensor- and pipeline-parallel ranks of one dp rank pass the
same (dp_rank, dp_size) and therefore read the same data.

Resume contract: the sampler object tracks *consumed* steps (`advance()` is called once per batch handed to the
training loop); iterating it walks a copy, so DataLoader prefetching does not move it. `state_dict()` after k consumed
steps restored into a fresh sampler yields step k+1 first.
Differences from InternEvo: iteration never ends (a new pass starts when the current one cannot fill a batch; the
loop stops at total_steps), and during ramp-up a pass drops a last batch it cannot fill instead of yielding it short.
"""
import bisect
import copy

import numpy as np

from evods.data.errors import DataError

SAMPLER_SEED = 1024


def parse_rampup(spec: str, micro_num: int):
    """"start incr every" -> (start, incr, every); "" -> no ramp-up (None)."""
    if not spec:
        return None
    try:
        start, incr, every = (int(x) for x in spec.split())
    except ValueError:
        raise DataError(f"rampup_batch_size must be 'start incr every' (three integers), not {spec!r}") from None
    if not (0 < start <= micro_num and incr >= 0 and every > 0):
        raise DataError(f"rampup_batch_size {spec!r}: need 0 < start <= micro_num ({micro_num}), incr >= 0, every > 0")
    return start, incr, every


class StaticBatchSampler:
    def __init__(self, num_samples: int, micro_num: int, rampup_batch_size: str = "", dp_rank: int = 0,
                 dp_size: int = 1, seed: int = SAMPLER_SEED):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.num_samples = num_samples
        self.batch_size = micro_num
        self.raw_rampup_batch_size = rampup_batch_size
        self._rampup = parse_rampup(rampup_batch_size, micro_num)
        self.data_rank = dp_rank
        self.data_world_size = dp_size
        self.seed = seed
        if num_samples < micro_num * dp_size:
            raise DataError(f"the training data has {num_samples} packs, fewer than micro_num * dp_size "
                            f"({micro_num} * {dp_size}); add data or lower micro_num / micro_bsz / seq_len")
        self._rng = np.random.RandomState(seed)
        self.epoch = -1
        self.batch_count = 0
        self._new_pass()

    def _new_pass(self):
        self.rng_state = self._rng.get_state()
        order = np.arange(self.num_samples)
        self._rng.shuffle(order)
        kept = self.num_samples // (self.batch_size * self.data_world_size) * self.batch_size * self.data_world_size
        self._rank_indices = order[:kept][self.data_rank::self.data_world_size]
        self.num_consumed_samples_in_epoch = 0
        self.epoch += 1

    def current_batch_size(self) -> int:
        if self._rampup is None:
            return self.batch_size
        start, incr, every = self._rampup
        return min(start + (self.batch_count // every) * incr, self.batch_size)

    def _next_batch(self) -> list[int]:
        size = self.current_batch_size()
        if self.num_consumed_samples_in_epoch + size > len(self._rank_indices):
            self._new_pass()
        begin = self.num_consumed_samples_in_epoch
        self.num_consumed_samples_in_epoch += size
        self.batch_count += 1
        return self._rank_indices[begin:begin + size].tolist()

    def advance(self):
        """Mark one step as consumed by the training loop."""
        self._next_batch()

    def __iter__(self):
        ahead = copy.deepcopy(self)
        while True:
            yield ahead._next_batch()

    def state_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "raw_rampup_batch_size": self.raw_rampup_batch_size,
            "rng_state": self.rng_state,
            "epoch": self.epoch,
            "seed": self.seed,
            "data_world_size": self.data_world_size,
            "num_consumed_samples_in_epoch": self.num_consumed_samples_in_epoch,
            "batch_count": self.batch_count,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict):
        for key in ("batch_size", "data_world_size", "raw_rampup_batch_size", "seed", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"cannot resume the data sampler: {key} was {state[key]!r} in the checkpoint and is "
                                f"{getattr(self, key)!r} now; resuming exactly needs the same data and settings")
        self._rng.set_state(state["rng_state"])
        self._new_pass()  # replays the shuffle of the pass in progress
        self.epoch = state["epoch"]
        self.batch_count = state["batch_count"]
        self.num_consumed_samples_in_epoch = state["num_consumed_samples_in_epoch"]


class BatchSkipper:
    """`skip_batches` ("100-200,350": inclusive ranges of batch_count) as a predicate: skipper(batch_count) -> bool."""

    def __init__(self, spec: str = ""):
        spans = []
        for part in filter(None, (p.strip() for p in (spec or "").split(","))):
            first, _, last = part.partition("-")
            try:
                span = (int(first), int(last or first))
            except ValueError:
                raise DataError(f"skip_batches: {part!r} is not 'N' or 'N-M' (in {spec!r})") from None
            if not 0 <= span[0] <= span[1]:
                raise DataError(f"skip_batches: {part!r} must be N-M with 0 <= N <= M (in {spec!r})")
            spans.append(span)
        merged = []
        for first, last in sorted(spans):
            if merged and first <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        self._firsts = [first for first, _ in merged]
        self._lasts = [last for _, last in merged]

    def __call__(self, batch_count: int) -> bool:
        i = bisect.bisect_right(self._firsts, batch_count) - 1
        return i >= 0 and batch_count <= self._lasts[i]
