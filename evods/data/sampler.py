"""Which packs each data-parallel rank reads at each step, and which steps to skip.

The config's `data.rampup_batch_size` and `data.skip_batches` are parsed here, once, when the config is loaded
(`parse_rampup`, `parse_skip_batches`); the sampler and the skipper take the parsed values.

StaticBatchSampler yields InternEvo's index stream (internlm/data/tokenized/batch_sampler.py): a pass shuffles all
pack indices with RandomState(1024) (the RNG continues from pass to pass) and keeps a multiple of micro_num * dp_size
(during the ramp-up: the ramp-up's packs plus a multiple of micro_num * dp_size, as its get_indices); rank r reads
indices[r::dp_size] in batches of the current batch size (micro_num, or less during ramp-up). A pass's last batch may
be shorter; it is yielded as it is. Tensor- and pipeline-parallel ranks of one dp rank pass the same (dp_rank, dp_size)
and therefore read the same data.

Resume contract: the sampler object tracks *consumed* steps (`advance()` is called once per batch handed to the
training loop); iterating it walks a copy, so DataLoader prefetching does not move it. `state_dict()` after k consumed
steps restored into a fresh sampler yields step k+1 first.
Differences from InternEvo: iteration never ends (a new pass starts when the current one is used up; the loop stops at
total_steps), and a resumed run continues the ramp-up where it was (InternEvo's checkpointed copy restarts batch_count
at 0 after a pass boundary, restarting the ramp-up on resume).
"""
import bisect
import copy
from dataclasses import dataclass

import numpy as np

from evods.data.errors import DataError

SAMPLER_SEED = 1024


@dataclass(frozen=True)
class Rampup:
    """rampup_batch_size "start increment every": a step takes `start` micro-batches, `increment` more every `every`
    steps, until micro_num."""

    start: int
    increment: int
    every: int

    def __str__(self) -> str:
        return f"{self.start} {self.increment} {self.every}"


def parse_rampup(text: str, micro_num: int) -> Rampup | None:
    """"start increment every" -> Rampup; "" -> None: no ramp-up, as InternEvo."""
    if not isinstance(text, str):
        raise DataError(f"rampup_batch_size must be a string, not {text!r}")
    if not text.strip():
        return None
    try:
        start, increment, every = (int(part) for part in text.split())
    except ValueError:
        raise DataError(f"rampup_batch_size must be 'start incr every' (three integers), not {text!r}") from None
    if not (0 < start <= micro_num and increment > 0 and every > 0):
        raise DataError(f"rampup_batch_size {text!r}: need 0 < start <= micro_num ({micro_num}), incr > 0, every > 0")
    return Rampup(start, increment, every)


def parse_skip_batches(text: str) -> tuple[tuple[int, int], ...]:
    """"100-200,350" -> ((100, 200), (350, 350)): inclusive ranges of batch_count, as written."""
    if not isinstance(text, str):
        raise DataError(f"skip_batches must be a string, not {text!r}")
    spans = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        try:
            span = (int(first), int(last or first))
        except ValueError:
            raise DataError(f"skip_batches: {part!r} is not 'N' or 'N-M' (in {text!r})") from None
        if not 0 <= span[0] <= span[1]:
            raise DataError(f"skip_batches: {part!r} must be N-M with 0 <= N <= M (in {text!r})")
        spans.append(span)
    return tuple(spans)


class StaticBatchSampler:
    def __init__(self, num_samples: int, micro_num: int, rampup: Rampup | None = None, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = SAMPLER_SEED):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.num_samples = num_samples
        self.batch_size = micro_num
        self.rampup = rampup
        # no ramp-up: the whole batch from the first step, as InternEvo
        self.start_bsz, self.bsz_incre, self.incre_every = (rampup.start, rampup.increment, rampup.every) if rampup \
            else (micro_num, micro_num, 1)
        self.data_rank = dp_rank
        self.data_world_size = dp_size
        self.seed = seed
        self._rng = np.random.RandomState(seed)
        self.epoch = -1
        self.batch_count = 0
        self._new_pass()

    @property
    def _rampup_batches(self) -> int:
        """Batches until the batch size reaches micro_num."""
        return (self.batch_size - self.start_bsz) // self.bsz_incre * self.incre_every

    def _rampup_samples(self) -> int:
        """Packs all ranks read during the ramp-up, as InternEvo counts them."""
        steps = (self.batch_size - self.start_bsz) // self.bsz_incre
        per_rank = sum(self.start_bsz + i * self.bsz_incre for i in range(steps)) * self.incre_every
        return per_rank * self.data_world_size

    def _kept(self, batch_count: int) -> int:
        """How many of a pass's shuffled packs it uses: the ramp-up's packs while the ramp-up lasts, then as many
        full micro_num * dp_size groups as fit."""
        rampup = self._rampup_samples() if batch_count < self._rampup_batches else 0
        if rampup > self.num_samples:
            raise DataError(f"Too much rampup samples: rampup_batch_size '{self.rampup}' reads "
                            f"{rampup} packs over {self.data_world_size} data-parallel ranks before reaching "
                            f"micro_num, but the training data has {self.num_samples}; shorten the ramp-up or add data")
        group = self.batch_size * self.data_world_size
        kept = (self.num_samples - rampup) // group * group + rampup
        if kept < self.batch_size:
            raise DataError(f"the training data has {self.num_samples} packs, too few for one batch of micro_num "
                            f"({self.batch_size}) on each of {self.data_world_size} data-parallel ranks; add data or "
                            "lower micro_num / micro_bsz / seq_len")
        return kept

    def _new_pass(self, batch_count: int | None = None):
        """Shuffle the next pass. `batch_count`: the count the pass started at (given when a resume replays it)."""
        self._pass_batch_count = self.batch_count if batch_count is None else batch_count
        kept = self._kept(self._pass_batch_count)
        self.rng_state = self._rng.get_state()
        order = np.arange(self.num_samples)
        self._rng.shuffle(order)
        self._rank_indices = order[:kept][self.data_rank::self.data_world_size]
        self.num_consumed_samples_in_epoch = 0
        self.epoch += 1

    def current_batch_size(self) -> int:
        return min(self.start_bsz + (self.batch_count // self.incre_every) * self.bsz_incre, self.batch_size)

    def _next_batch(self) -> list[int]:
        if self.num_consumed_samples_in_epoch >= len(self._rank_indices):
            self._new_pass()
        begin = self.num_consumed_samples_in_epoch
        batch = self._rank_indices[begin:begin + self.current_batch_size()]
        self.num_consumed_samples_in_epoch += len(batch)
        self.batch_count += 1
        return batch.tolist()

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
            "pass_batch_count": self._pass_batch_count,
            "num_samples": self.num_samples,
        }

    @property
    def raw_rampup_batch_size(self) -> str:
        """The ramp-up as a config writes it ("" for none): what sampler states keep (InternEvo's too)."""
        return str(self.rampup or "")

    def load_state_dict(self, state: dict):
        saved = dict(state)
        if "raw_rampup_batch_size" in saved:  # as a config wrote it: its numbers count, not its spacing
            saved["raw_rampup_batch_size"] = " ".join(saved["raw_rampup_batch_size"].split())
        for key in ("batch_size", "data_world_size", "raw_rampup_batch_size", "seed", "num_samples"):
            if key in saved and saved[key] != getattr(self, key):
                raise DataError(f"cannot resume the data sampler: {key} was {state[key]!r} in the checkpoint and is "
                                f"{getattr(self, key)!r} now; resuming exactly needs the same data and settings")
        self._rng.set_state(state["rng_state"])
        # replays the shuffle of the pass in progress, kept as when it started
        self._new_pass(state.get("pass_batch_count", state["batch_count"]))
        self.epoch = state["epoch"]
        self.batch_count = state["batch_count"]
        self.num_consumed_samples_in_epoch = state["num_consumed_samples_in_epoch"]


class BatchSkipper:
    """`skip_batches` (`parse_skip_batches`: inclusive ranges of batch_count) as a predicate:
    skipper(batch_count) -> bool."""

    def __init__(self, spans: tuple[tuple[int, int], ...] = ()):
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
