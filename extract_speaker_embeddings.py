#!/usr/bin/env python3
"""Stage 1 worker: `python extract_speaker_embeddings.py ...` or `torchrun ... extract_speaker_embeddings.py ...`."""
import sys

from speakerlab.extract import main

if __name__ == "__main__":
    sys.exit(main())
