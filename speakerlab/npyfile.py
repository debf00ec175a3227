"""Plain ``.npy`` files written and read a block of rows at a time, for matrices larger than memory.

``NpyWriter`` writes the header for a known number of rows, then appends blocks; the file appears
under its name (renamed from a temporary name) only once every row is written. ``MappedNpy`` maps a
file read-only and hands out copies of row blocks; the pages it touched are released from the
process after each block (``madvise(DONTNEED)``; the kernel's page cache keeps them), so reading a
7.7 GB matrix from end to end never holds more than one block in the process's memory. Any
``.npy`` written here also opens with ``np.load(path, mmap_mode="r")``.
"""
import mmap
import os
import threading
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np

BLOCK_BYTES = 32 << 20  # rows per block: about this many bytes


def rows_per_block(row_bytes: int, budget: int = BLOCK_BYTES) -> int:
    return max(1, budget // max(1, row_bytes))


class NpyWriter:
    """``rows`` x ``tail`` array of ``dtype`` written block by block to ``path`` (atomically)."""

    def __init__(self, path, rows: int, tail: Tuple[int, ...] = (), dtype=np.float32):
        self.path = Path(path)
        self.rows = int(rows)
        self.tail = tuple(int(t) for t in tail)
        self.dtype = np.dtype(dtype)
        self.written = 0
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._handle = open(self.tmp, "wb")
        try:
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (self.rows,) + self.tail}
            np.lib.format.write_array_header_2_0(self._handle, header) if self._too_big(header) else \
                np.lib.format.write_array_header_1_0(self._handle, header)
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _too_big(header) -> bool:
        return len(repr(header)) > 60000

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.tail:
            raise ValueError(f"{self.path}: rows of shape {block.shape[1:]}, expected {self.tail}")
        if self.written + len(block) > self.rows:
            raise ValueError(f"{self.path}: more than the {self.rows} rows announced")
        self._handle.write(block.tobytes())
        self.written += len(block)

    def close(self) -> Path:
        """Finish: every announced row must have been written; then fsync and rename into place."""
        if self.written != self.rows:
            self.abort()
            raise ValueError(f"{self.path}: {self.written} rows written, {self.rows} announced")
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from None
        return self.path

    def abort(self) -> None:
        try:
            self._handle.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.close()
        else:
            self.abort()


def write_npy(path, array: np.ndarray) -> Path:
    """A whole (small) array, atomically."""
    array = np.asarray(array)
    with NpyWriter(path, len(array), array.shape[1:], array.dtype) as writer:
        writer.write(array)
    return Path(path)


def _read_at(handle, view: memoryview, offset: int, lock) -> int:
    """Read into ``view`` at ``offset`` without moving a shared file position where the OS allows
    (``os.preadv``); elsewhere under ``lock``, with seek and readinto."""
    if hasattr(os, "preadv"):
        return os.preadv(handle.fileno(), [view], offset)
    with lock:
        handle.seek(offset)
        return handle.readinto(view)


class MappedNpy:
    """A read-only map of a ``.npy`` file; ``block(a, b)`` copies rows a:b and releases their pages."""

    def __init__(self, path, base: int = 0):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            handle.seek(base)
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(handle)
            self.offset = handle.tell()
            size = os.fstat(handle.fileno()).st_size
            if fortran:
                raise ValueError(f"{self.path}: Fortran-ordered arrays are not supported")
            self.shape, self.dtype = tuple(shape), np.dtype(dtype)
            self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
            needed = self.offset + self.row_bytes * (self.shape[0] if self.shape else 1)
            if size < needed:
                raise ValueError(f"{self.path}: {size} bytes, its header announces {needed} (cut short?)")
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        count = self.shape[0] if self.shape else 1
        self._file = None
        self._open_lock = threading.Lock()
        self.array = (np.frombuffer(self._map, dtype=self.dtype, count=int(np.prod(self.shape, dtype=np.int64)),
                                    offset=self.offset).reshape(self.shape)
                      if self._map is not None and count else np.zeros(self.shape, self.dtype))

    @classmethod
    def member(cls, path, name: str) -> "MappedNpy":
        """A member ``name`` of an ``.npz`` stored without compression (``np.savez``), mapped in place."""
        import zipfile
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(name + ".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: member {name} is compressed and cannot be mapped")
            with open(path, "rb") as handle:
                handle.seek(info.header_offset)
                local = handle.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise ValueError(f"{path}: damaged zip entry for {name}")
                start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                    int.from_bytes(local[28:30], "little")
        return cls(path, start)

    def __len__(self) -> int:
        return self.shape[0]

    def release(self, start: int = 0, stop: Optional[int] = None) -> None:
        """Drop the mapped pages of rows start:stop from this process (the page cache keeps them)."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        stop = len(self) if stop is None else stop
        first = (self.offset + start * self.row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        last = min(len(self._map), self.offset + stop * self.row_bytes)
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def block(self, start: int, stop: int) -> np.ndarray:
        out = np.array(self.array[start:stop])
        self.release(start, stop)
        return out

    def read(self, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows start:stop read with plain file reads into ``out`` (or a new array): no page of the map
        is touched, so scans of a large file neither fault nor grow the process."""
        stop = min(stop, len(self))
        count = max(0, stop - start)
        if out is None:
            out = np.empty((count,) + self.shape[1:], self.dtype)
        else:
            out = out[:count]
        if count:
            with self._open_lock:
                if self._file is None:
                    self._file = open(self.path, "rb", buffering=0)
            fd, where = self._file.fileno(), self.offset + start * self.row_bytes
            view = memoryview(out.reshape(-1).view(np.uint8))
            done = 0
            while done < len(view):  # positioned reads: no shared file offset, so threads may read at once
                got = _read_at(self._file, view[done:], where + done, self._open_lock)
                if not got:
                    raise ValueError(f"{self.path}: ends before row {stop} (cut short?)")
                done += got
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows by index (any order), pages released afterwards."""
        rows = np.asarray(rows, dtype=np.int64)
        out = self.array[rows] if len(rows) else np.zeros((0,) + self.shape[1:], self.dtype)
        if len(rows):
            self.release(int(rows.min()), int(rows.max()) + 1)
        return out

    def blocks(self, block_rows: Optional[int] = None, start: int = 0,
               stop: Optional[int] = None) -> Iterator[Tuple[int, np.ndarray]]:
        stop = len(self) if stop is None else stop
        step = block_rows or rows_per_block(self.row_bytes)
        for first in range(start, stop, step):
            yield first, self.block(first, min(stop, first + step))

    def close(self) -> None:
        self.array = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view handed out is still alive; the map goes with it
                pass
            self._map = None
