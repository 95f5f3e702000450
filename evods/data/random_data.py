"""InternEvo's dummy data (its RandomDataset), used when no train_folder is set so that training runs with no data
at all."""
import numpy as np

RANDOM_DATA_SEED = 1999


class RandomDataset:
    """Sample i is [n, r] + list(range(n)) * r, cut to max_len, with n in [1, 30) and r in [10, 200) drawn by
    RandomState(1999) as InternEvo draws them (all n first, then all r). Tokens are built on access."""

    type_id = 0

    def __init__(self, num_samples: int, max_len: int):
        rng = np.random.RandomState(RANDOM_DATA_SEED)
        self._n = rng.randint(1, 30, size=num_samples)
        self._r = rng.randint(10, 200, size=num_samples)
        self.max_len = max_len
        self.lengths = np.minimum(2 + self._n * self._r, max_len).astype(np.int64)

    def __len__(self):
        return len(self._n)

    def __getitem__(self, index) -> np.ndarray:
        n, r = int(self._n[index]), int(self._r[index])
        return np.concatenate([[n, r], np.tile(np.arange(n), r)])[:self.max_len].astype(np.int64)
