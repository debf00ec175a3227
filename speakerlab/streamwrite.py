"""Writers that take the final files a record or a block at a time (the streamed merge).

Each writes into a file of a final dir under construction (``finaldir`` builds the dir beside its
target and swaps it in whole), so none of them needs its own temporary name.

- ``JsonListWriter``: a JSON array (``.json``, as the seed's lists) or JSON lines (``.jsonl``, one
  record a line: line i is row i of the matching ``.npy``).
- ``PickleDictWriter``: a pickle of ``{key: record}`` built entry by entry: ``pickle.load`` gives the
  same dict as pickling the whole dict would, but the dict never exists in the writer.
- ``NpzMemberWriter``: an ``.npz`` (``keys``, ``embeddings``) with the members streamed into the zip.
- ``KaldiWriter``: ark/scp through kaldiio, row by row.
"""
import io
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np


class JsonListWriter:
    def __init__(self, path, lines: bool):
        self.path, self.lines, self.count = Path(path), lines, 0
        self._handle = open(self.path, "w", encoding="utf-8")
        if not lines:
            self._handle.write("[")

    def write_text(self, text: str) -> None:
        """One record, already serialised as a JSON object."""
        if self.lines:
            self._handle.write(text + "\n")
        else:
            self._handle.write(("\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    def write(self, record: dict) -> None:
        self.write_text(json.dumps(record, ensure_ascii=False))

    def close(self) -> None:
        if not self.lines:
            self._handle.write("\n]" if self.count else "]")
        self._handle.close()


class PickleDictWriter:
    """``{key: value}`` pickled in batches of SETITEMS (protocol 2 opcodes, no memo)."""
    BATCH = 1000

    def __init__(self, path):
        self.path = Path(path)
        self._handle = open(self.path, "wb")
        self._handle.write(pickle.PROTO + bytes([2]) + pickle.EMPTY_DICT)
        self._batch = io.BytesIO()
        self._pending = 0

    @staticmethod
    def _fragment(obj) -> bytes:
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=2)
        pickler.fast = True  # no memo: fragments are concatenated into one stream
        pickler.dump(obj)
        data = buffer.getvalue()
        return data[2:-1]  # without PROTO 2 and STOP

    def write(self, key, value) -> None:
        self._batch.write(self._fragment(key) + self._fragment(value))
        self._pending += 1
        if self._pending >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._handle.write(pickle.MARK + self._batch.getvalue() + pickle.SETITEMS)
            self._batch = io.BytesIO()
            self._pending = 0

    def close(self) -> None:
        self._flush()
        self._handle.write(pickle.STOP)
        self._handle.close()


class NpzMemberWriter:
    """An ``.npz`` whose members are written as streams: ``member(name, shape, dtype)`` then ``write``."""

    def __init__(self, path):
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._member = None

    def member(self, name: str, shape, dtype) -> None:
        self.end_member()
        self._member = self._zip.open(name + ".npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": tuple(int(s) for s in shape)}
        np.lib.format.write_array_header_1_0(self._member, header)
        self._dtype = np.dtype(dtype)

    def write(self, block) -> None:
        self._member.write(np.ascontiguousarray(block, dtype=self._dtype).tobytes())

    def end_member(self) -> None:
        if self._member is not None:
            self._member.close()
            self._member = None

    def close(self) -> None:
        self.end_member()
        self._zip.close()


def kaldi_key(key: str) -> str:
    return re.sub(r"\s", "_", key)


class KaldiWriter:
    """ark/scp written row by row; the scp names the ark by ``final_ark`` (where it will live)."""

    def __init__(self, ark: Path, scp: Path, final_ark: Path):
        import kaldiio
        self.ark, self.scp, self.final_ark = Path(ark), Path(scp), Path(final_ark)
        self._helper = kaldiio.WriteHelper(f"ark,scp:{self.ark},{self.scp}")
        self._writer = self._helper.__enter__()
        self.renamed = {}
        self._last: Optional[str] = None

    def write(self, key: str, row) -> None:
        name = kaldi_key(key)
        if name != key:
            self.renamed[key] = name
        self._writer(name, np.asarray(row, dtype=np.float32))

    def close(self) -> None:
        self._helper.__exit__(None, None, None)
        # the scp names the ark by path: point it at the final name (a line at a time)
        tmp = self.scp.with_name(self.scp.name + ".paths")
        with open(self.scp, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
            for line in src:
                dst.write(line.replace(str(self.ark), str(self.final_ark)))
        os.replace(tmp, self.scp)
