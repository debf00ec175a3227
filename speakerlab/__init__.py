"""speakerlab: speaker-embedding extraction (3D-Speaker models) and a small Python API.

The names below load on first use, so ``import speakerlab`` stays light (no torch until needed).
"""
import os

# oneDNN (torch's CPU kernels) builds kernels per input shape and keeps 1024 by default: a few batch
# shapes of CAM++ fill that. Batches are padded to grid lengths (batching.py) so shapes repeat; a
# larger cache lets their kernels stay. Read when torch first uses oneDNN; an explicit setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

_API = ("load_model", "load_embeddings", "cosine", "SpeakerModel", "EmbeddingSet", "Match")

__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        from speakerlab import api
        return getattr(api, name)
    raise AttributeError(f"module 'speakerlab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
