"""One `seed` drives everything: each consumer draws from its own stream derived from (seed, stream, ...)."""

from __future__ import annotations

import numpy as np
import torch

# Stream ids: adding a consumer never shifts the numbers of the others.
DATA, INIT, SAMPLING, SHUFFLE, CURVATURE, DROPOUT, AUGMENT, LOCAL_WORK = range(8)


def derived_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, *keys))


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))
