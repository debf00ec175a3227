#!/usr/bin/env python3
"""Stage 1 worker: `python extract_speaker_embeddings.py ...` or `torchrun ... extract_speaker_embeddings.py ...`
(installed: `speakerlab-extract ...`)."""
from speakerlab.cli import extract

if __name__ == "__main__":
    extract()
