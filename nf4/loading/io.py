"""Moving validated tensors' bytes from safetensors shards to a device: mmap, or read().

Only entries of a validated ``Checkpoint`` come here (dtype, shape, byte span inside the file:
``nf4.loading.checkpoint``). Before the first byte of a shard is used, its size is checked again
against the end of every span this load reads from it, and on the mmap path again before every
chunk, so a shard truncated after validation raises ValueError naming the file and the tensor.

Two ways to take the bytes, one pipeline (``stream_tensors``):

- ``mmap``: each shard is mapped once (``MAP_PRIVATE``; nothing writes through it) and bytes are
  copied straight out of the page cache. To CUDA, reader threads copy chunks of the map into pinned
  staging buffers whose contents go to the GPU while the next chunks are copied. On the CPU, a
  tensor with no destination is a view of the mapped pages: no copy at all.
- ``read``: the same pipeline with ``pread`` into the pinned buffers (CUDA), or into the tensor
  (CPU).
- ``auto`` (the default): mmap for chunks whose pages are in the page cache, ``pread`` for the
  others, ``read`` where a file cannot be mapped (See Note: choosing between mmap and read()).

Note: choosing between mmap and read().
    The two cost differently per machine and per page-cache state. Warm, on the H200 machine (16
    cores, commit d3a16ab, 16 GB Llama-3-8B bf16) a Python ``read()`` of the shards ran at 1.64 GB/s
    and the whole nf4 load, 8 threads of ``pread`` into pinned buffers, took 7.5 s, while mmap +
    ``torch.frombuffer`` moved the 16 GB to the GPU in 256 MB chunks in 1.81 s (8.9 GB/s) on one
    thread: that machine's read syscalls are slow and its page faults are not. On the H100
    machine the ``pread`` pipeline moved 16 GB in 0.73 s (22 GB/s, bench/RESULTS.md). mmap pays a
    page fault per 64 KiB (fault-around) instead of a syscall and a kernel copy per read, and the
    reader threads take the faults in parallel. Cold (pages not in the cache), a fault reads one
    readahead window while ``pread`` asks the disk for the whole 32 MiB chunk: on the 2-core
    development VM, 256 MB dropped with POSIX_FADV_DONTNEED, 4 threads, 32 MiB chunks, ``pread``
    ran at 1.34 and 0.54 GB/s in two runs, copies from the map (MADV_WILLNEED or not) at 0.76-0.93
    and 0.34-0.39 GB/s (one thread: mixed, 0.63 vs 0.57 and 0.36 vs 0.61).
    Rule (``auto``): map every shard; copy each chunk from the map when its first page is in the
    page cache (a 1-byte ``preadv`` with RWF_NOWAIT, ~2.4 us per 32 MiB chunk), else ``pread`` it
    (which also fills the cache). A shard that cannot be mapped (a filesystem without mmap:
    OSError) is read with ``read()``, announced by one log line per load. On the CPU, a tensor
    without a destination is a view of the map whatever the cache holds (no copy, no memory).
    ``NF4_LOAD_IO=mmap|read|auto`` (or ``strategy=``) forces one; a forced mmap that fails
    raises. bench/bench_load.py measures the three, warm and cold, beside the raw mmap-to-GPU
    ceiling: its table is the evidence for revising this rule.

Note: memory of the mmap path.
    Mapped pages are page cache: file-backed, counted in RssFile (so in RSS, as transformers'
    loader shows 16.8 GB "peak RSS" for a 16 GB checkpoint), not in RssAnon, and the kernel drops
    them under memory pressure and re-reads them from the file. Anonymous memory stays at the
    pinned staging buffers (12 x 32 MiB) plus whatever the consumer keeps. A write through a CPU
    view lands in a private copy of that page (MAP_PRIVATE), never in the file.

Note: a file truncated while mapped.
    Reading a mapped page past a file's new end raises SIGBUS, which ends the process (so it does
    for any mmap reader: safetensors, numpy.memmap). The size is checked before each 32 MiB chunk
    (one fstat: 3 us on the development VM, against ~3 ms to copy 32 MiB at 10 GB/s), which leaves
    the window of one chunk copy; ``read()``
    has none (a short read raises ValueError). A CPU view reads the map for as long as it lives,
    so the model loader gives every tensor it keeps its own memory (a destination) and only
    tensors it quantizes and drops are views.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import mmap
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from nf4.loading.checkpoint import TensorEntry, _check_out, _pread_into, concrete_device

log = logging.getLogger(__name__)

STRATEGY_ENV = "NF4_LOAD_IO"
STRATEGIES = ("auto", "mmap", "read")
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)

# Staging for host -> GPU: chunks of 32 MiB, 12 of them (384 MiB pinned). Eight reader threads
# keep 8 chunks in flight while up to 4 wait for or ride the copy engine; one thread reads page
# cache at ~4-6 GB/s, so several are needed to feed a 25-50 GB/s PCIe Gen5 link. One stream
# carries the copies: it moved 22 GB/s on the H100 machine (read:8, 0.73 s for 16 GB), above
# what the readers supply, and the consumer's kernels on it need no synchronization.
STAGING_CHUNK_BYTES = 32 * 1024 * 1024
STAGING_BUFFERS = 12
READER_THREADS = 8
# A slot is refilled only after this many later copies were queued, so the host rarely waits on
# the copy engine (a 32 MiB copy takes ~1 ms; waiting on the one just queued would serialize them).
COPY_LAG = 2


def resolve_strategy(strategy: Optional[str] = None) -> str:
    """``strategy``, else ``$NF4_LOAD_IO``, else ``auto``; one of STRATEGIES (See Note: choosing)."""
    value = strategy if strategy is not None else os.environ.get(STRATEGY_ENV, "auto")
    if value not in STRATEGIES:
        source = "strategy" if strategy is not None else STRATEGY_ENV
        raise ValueError(f"{source} must be one of {list(STRATEGIES)}, got {value!r}")
    return value


def _cached(fd: int, offset: int) -> bool:
    """Whether the page holding byte ``offset`` is in the page cache: a 1-byte read that may not
    wait for the disk (RWF_NOWAIT, Linux). Unknown (no RWF_NOWAIT, or a filesystem that refuses
    it) counts as cached: the map serves either way."""
    if _RWF_NOWAIT is None:
        return True
    try:
        return os.preadv(fd, [bytearray(1)], offset, _RWF_NOWAIT) == 1
    except BlockingIOError:
        return False
    except OSError:
        return True


class _Shards:
    """The shards one stream reads: a descriptor each (pread is thread-safe) and, when the
    strategy maps files, a map each. ``open`` runs on the consumer's thread only; reader threads
    call ``fill`` on shards already open."""

    def __init__(self, entries: list[TensorEntry], strategy: str):
        self.strategy = strategy
        # shard -> (end of the last byte read from it, the entry that ends there)
        self._needed: dict[Path, tuple[int, TensorEntry]] = {}
        for e in entries:
            if e.nbytes and e.offset + e.nbytes > self._needed.get(e.shard, (-1, None))[0]:
                self._needed[e.shard] = (e.offset + e.nbytes, e)
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, Optional[mmap.mmap]] = {}
        self._fell_back = False

    def open(self, path: Path) -> None:
        if path in self._fds:
            return
        fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        end, entry = self._needed[path]
        self._check_size(fd, end, entry)
        self._maps[path] = self._map(path, fd) if self.strategy != "read" else None

    def _map(self, path: Path, fd: int) -> Optional[mmap.mmap]:
        try:
            return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            if self.strategy == "mmap":
                raise OSError(e.errno, f"{path}: cannot be memory-mapped ({e.strerror}); "
                                       f"{STRATEGY_ENV}=mmap forces mmap, use auto or read here") from e
            if not self._fell_back:
                log.warning("%s cannot be memory-mapped (%s); reading shards with read() instead",
                            path, e.strerror)
                self._fell_back = True
            return None

    @staticmethod
    def _check_size(fd: int, end: int, entry: TensorEntry) -> None:
        size = os.fstat(fd).st_size
        if size < end:
            raise ValueError(f"{entry.shard}: tensor {entry.name!r} needs the file's bytes up to {end}, "
                             f"but it now holds {size} (truncated or changed after its header was "
                             f"validated)")

    def fill(self, out: np.ndarray, entry: TensorEntry, start: int) -> None:
        """Bytes ``[start, start + len(out))`` of ``entry`` into ``out`` (uint8, contiguous)."""
        offset = entry.offset + start
        mapped = self._maps[entry.shard]
        if mapped is None or (self.strategy == "auto" and not _cached(self._fds[entry.shard], offset)):
            # Not mapped, or (auto) not in the page cache: See Note: choosing between mmap and read().
            _pread_into(self._fds[entry.shard], memoryview(out).cast("B"), offset, entry)
            return
        # See Note: a file truncated while mapped.
        self._check_size(self._fds[entry.shard], offset + len(out), entry)
        np.copyto(out, np.frombuffer(mapped, dtype=np.uint8, count=len(out), offset=offset))

    def view(self, entry: TensorEntry) -> Optional[torch.Tensor]:
        """The entry as a tensor over the mapped pages (no copy), or None where the shard is not
        mapped or its bytes are not aligned for the dtype (an odd offset: torch needs alignment)."""
        mapped = self._maps[entry.shard]
        if mapped is None or not entry.nbytes:
            return None
        self._check_size(self._fds[entry.shard], entry.offset + entry.nbytes, entry)
        data = np.frombuffer(mapped, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
        if data.ctypes.data % entry.dtype.itemsize:
            return None
        return torch.from_numpy(data).view(entry.dtype).reshape(entry.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        # Not mm.close(): CPU views may still export the map; it is unmapped when the last goes.
        self._maps.clear()


def stream_tensors(entries: Iterable[TensorEntry], device,
                   destination: Optional[Callable[[TensorEntry], Optional[torch.Tensor]]] = None,
                   progress: Optional[Callable[[int], None]] = None,
                   strategy: Optional[str] = None) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """Yield ``(entry, tensor on device)`` for each validated entry in order, one tensor at a time.

    ``destination(entry)`` may return the tensor to fill (contiguous, ``entry.nbytes`` bytes, on
    ``device``, any dtype/shape: e.g. the final parameter) to avoid a second copy; otherwise a new
    tensor of the entry's dtype and shape is made, except on the CPU with mmap, where it is a
    view of the mapped file (See Note: a file truncated while mapped: give tensors you keep a
    destination). ``progress(nbytes)`` is called as bytes land. ``strategy`` is ``auto``,
    ``mmap`` or ``read`` (default ``$NF4_LOAD_IO`` or ``auto``; See Note: choosing).

    On CUDA, bytes travel through pinned staging buffers filled by reader threads, and the
    host-to-device copies are queued on the current stream, so the consumer's kernels on that
    stream see complete tensors without a synchronization; host memory stays at the staging
    buffers whatever the tensor sizes.
    """
    device = concrete_device(device)
    entries = list(entries)
    shards = _Shards(entries, resolve_strategy(strategy))
    try:
        if device.type == "cuda":
            yield from _stream_cuda(entries, device, destination, progress, shards)
        else:
            yield from _stream_host(entries, device, destination, progress, shards)
    finally:
        shards.close()


def _stream_host(entries: list[TensorEntry], device: torch.device, destination, progress,
                 shards: _Shards):
    for entry in entries:
        out = destination(entry) if destination is not None else None
        if out is not None and out.device.type != "cpu":
            out = None
        tensor = None
        if entry.nbytes:
            shards.open(entry.shard)
            if out is None:
                tensor = shards.view(entry)
        if tensor is None:
            tensor = torch.empty(entry.shape, dtype=entry.dtype) if out is None else out
            _check_out(entry, tensor)
            if entry.nbytes:
                shards.fill(_bytes_of(tensor), entry, 0)
        if progress is not None:
            progress(entry.nbytes)
        yield entry, tensor.to(device) if device.type != "cpu" else tensor


def _stream_cuda(entries: list[TensorEntry], device: torch.device, destination, progress,
                 shards: _Shards):
    chunks = []  # (entry index, byte offset within the tensor, length)
    for i, e in enumerate(entries):
        chunks += [(i, start, min(STAGING_CHUNK_BYTES, e.nbytes - start))
                   for start in range(0, e.nbytes, STAGING_CHUNK_BYTES)]
    remaining = collections.Counter(i for i, _, _ in chunks)
    size = min(STAGING_CHUNK_BYTES, max((c[2] for c in chunks), default=1))
    buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(STAGING_BUFFERS)]
    arrays = [b.numpy() for b in buffers]
    # Free slots, oldest first, each with the event of the copy that last read it (None: unused).
    free: collections.deque = collections.deque((slot, None) for slot in range(len(buffers)))
    targets: dict[int, torch.Tensor] = {}
    # The stream the copies to ``device`` run on; an event recorded on the current device's stream
    # would not follow them when ``device`` is another GPU (cuda:1 while cuda:0 is current).
    stream = torch.cuda.current_stream(device)
    next_entry = 0

    def read(slot: int, chunk) -> None:
        i, start, length = chunk
        shards.fill(arrays[slot][:length], entries[i], start)

    def emit_empty_until(limit: int):
        # Tensors with no bytes have no chunks; hand them out in order.
        nonlocal next_entry
        while next_entry < limit:
            yield entries[next_entry], _target(entries[next_entry], device, destination, targets, next_entry)
            next_entry += 1

    try:
        with concurrent.futures.ThreadPoolExecutor(READER_THREADS, thread_name_prefix="nf4-read") as pool:
            pending: collections.deque = collections.deque()
            submitted = 0
            while submitted < len(chunks) or pending:
                while submitted < len(chunks) and len(free) > COPY_LAG:
                    slot, event = free.popleft()
                    if event is not None:
                        event.synchronize()  # a copy issued COPY_LAG chunks ago: usually finished
                    shards.open(entries[chunks[submitted][0]].shard)
                    pending.append((slot, chunks[submitted], pool.submit(read, slot, chunks[submitted])))
                    submitted += 1
                slot, (i, start, length), future = pending.popleft()
                future.result()
                yield from emit_empty_until(i)
                _target(entries[i], device, destination, targets, i).reshape(-1).view(torch.uint8)[
                    start:start + length].copy_(buffers[slot][:length], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                free.append((slot, event))
                if progress is not None:
                    progress(length)
                remaining[i] -= 1
                if remaining[i] == 0:
                    next_entry = i + 1
                    yield entries[i], targets.pop(i)
            yield from emit_empty_until(len(entries))
    finally:
        # Pinned buffers go back to the host allocator only once no copy reads them.
        for _, event in free:
            if event is not None:
                event.synchronize()


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a writable uint8 array (0-dim tensors included)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _target(entry: TensorEntry, device, destination, targets: dict, i: int) -> torch.Tensor:
    if i not in targets:
        out = destination(entry) if destination is not None else None
        if out is None or out.device != device:
            out = torch.empty(entry.shape, dtype=entry.dtype, device=device)
        _check_out(entry, out)
        targets[i] = out
    return targets[i]
