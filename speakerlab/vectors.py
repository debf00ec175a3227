"""Small vector helpers shared by the in-memory and the memory-mapped embedding sets."""
from collections import namedtuple
from typing import List, Sequence

import numpy as np

Match = namedtuple("Match", "key score")


def cosine(a, b) -> float:
    """Cosine similarity of two vectors."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def query_vector(query, dim: int) -> np.ndarray:
    """A query given as a vector (numpy or torch) as float32 (dim,), or a ValueError."""
    vector = np.asarray(query.detach().cpu() if hasattr(query, "detach") else query, dtype=np.float32)
    if vector.ndim != 1 or vector.shape[0] != dim:
        raise ValueError(f"query vector must have shape ({dim},), not {vector.shape}")
    return vector


def top(keys: Sequence[str], scores: np.ndarray, keep: np.ndarray, k: int) -> List[Match]:
    """The k best of ``scores`` where ``keep``, highest first (ties in key order)."""
    candidates = np.flatnonzero(keep)
    if k <= 0 or not len(candidates):
        return []
    chosen = candidates[np.argsort(-scores[candidates], kind="stable")[:k]]
    return [Match(keys[i], float(scores[i])) for i in chosen]
