"""Stage 3: remove the intermediate dir, but only once the final files are verified complete."""
import argparse
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np

from speakerlab.store import read_json


def verify_final(final_dir: Path) -> str:
    """Return '' if the final dir is complete and consistent, else why not."""
    summary_path = final_dir / "summary.json"
    if not summary_path.is_file():
        return f"{summary_path} is missing (merge did not finish)"
    summary = read_json(summary_path)
    for name in summary.get("files", []):
        if not (final_dir / name).is_file():
            return f"{final_dir / name} is missing"
    utterances = read_json(final_dir / "utterance_list.json")
    speakers = read_json(final_dir / "speaker_list.json")
    if len(utterances) != summary["total_utterances"] or len(speakers) != summary["total_speakers"]:
        return "utterance/speaker lists disagree with summary.json"
    if "utterance_embeddings.npz" in summary.get("files", []):
        with np.load(final_dir / "utterance_embeddings.npz", allow_pickle=False) as data:
            if data["embeddings"].shape[0] != summary["total_utterances"]:
                return "utterance_embeddings.npz disagrees with summary.json"
    else:  # our own file, written by merge in this same pipeline
        with open(final_dir / "utterance_embeddings.pkl", "rb") as handle:
            if len(pickle.load(handle)) != summary["total_utterances"]:
                return "utterance_embeddings.pkl disagrees with summary.json"
    if summary.get("partial"):
        return "the merge was partial (--allow_partial); keeping the intermediate results"
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--final_dir", required=True)
    p.add_argument("--intermediate_dir", required=True)
    args = p.parse_args(argv)
    final_dir, intermediate = Path(args.final_dir), Path(args.intermediate_dir)
    if final_dir.resolve() == intermediate.resolve():
        print("error: final and intermediate dirs are the same", file=sys.stderr)
        return 2
    problem = verify_final(final_dir)
    if problem:
        print(f"error: not removing {intermediate}: {problem}", file=sys.stderr)
        return 1
    if not (intermediate / "scan.json").is_file():
        print(f"error: {intermediate} does not look like an extraction dir (no scan.json); not removing it",
              file=sys.stderr)
        return 1
    shutil.rmtree(intermediate)
    print(f"removed {intermediate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
