"""The measurements behind torchckpt's save and snapshot choices, each against its alternative.

    python benchmarks/ablations.py            # ~2 min on 2 cores; prints a markdown table

Each row is the median (and min) of interleaved repeats of both variants, on a 256 MiB state
(few: 4 tensors; many: 2048 tensors of 128 KiB) in the temp directory:

- zip CRC-32: torch.save with and without computing it (torchckpt skips it; xxh3 covers the file);
- write-out: write + fsync with and without starting the disk write-out every 32 MiB;
- snapshot copy: torch ``copy_`` against one ``memcpy`` per tensor, into warm memory;
- snapshot memory: shared (shmem) against private anonymous mappings;
- fresh against reused (warm) snapshot memory;
- checksum of 256 MiB: mmap + xxh3 against ``read`` into a reused buffer.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torchckpt import _fileio, serialization

MiB = 1 << 20
SIZE = 256 * MiB


def bench(variants: dict, repeats: int = 7) -> dict[str, tuple[float, float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def state(shape: str) -> dict[str, torch.Tensor]:
    if shape == "few":
        return {f"w{i}": torch.randn(SIZE // 16) for i in range(4)}
    return {f"p{i}": torch.randn(32 * 1024) for i in range(SIZE // (128 * 1024))}


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def main() -> None:
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="torchckpt-ablation-"))

    def add(what, results):
        for name, (median, best) in results.items():
            rows.append(f"| {what} | {name} | {median:.3f} | {best:.3f} |")

    from torch.utils.serialization import config

    for shape in ("few", "many"):
        sd = state(shape)

        def torch_save(crc, sd=sd):
            def run():
                config.save.compute_crc32 = crc
                try:
                    torch.save(sd, tmp / "t.pt")
                finally:
                    config.save.compute_crc32 = True
                fsync(tmp / "t.pt")
            return run

        add(f"torch.save + fsync, {shape}", bench({"with zip CRC-32 (torch's default)": torch_save(True),
                                                    "without (torchckpt)": torch_save(False)}))

        def ours(every, sd=sd):
            def run():
                with _fileio.atomic_writer(tmp / "o.pt", writeback_every=every) as stream:
                    serialization.save(sd, stream)
            return run

        add(f"torchckpt write + fsync, {shape}", bench({"write-out started every 32 MiB (torchckpt)": ours(32 * MiB),
                                                         "fsync only at the end": ours(1 << 62)}))

        dst = {k: torch.empty_like(v) for k, v in sd.items()}
        for k, v in sd.items():
            dst[k].copy_(v)

        def copy_(sd=sd, dst=dst):
            for k, v in sd.items():
                dst[k].copy_(v)

        def memmove(sd=sd, dst=dst):
            for k, v in sd.items():
                ctypes.memmove(dst[k].data_ptr(), v.data_ptr(), v.nbytes)

        add(f"snapshot copy, {shape}", bench({"torch copy_": copy_, "memcpy per tensor (torchckpt)": memmove}))

    sizes = [128 * 1024] * (SIZE // (128 * 1024))
    src = torch.randn(SIZE // 4)
    src_ptr = src.data_ptr()

    def into(flags, keep):
        def run():
            m = keep[0] if keep else mmap.mmap(-1, SIZE, flags=flags)
            address = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
            offset = 0
            for size in sizes:
                ctypes.memmove(address + offset, src_ptr + offset, size)
                offset += size
            if keep is not None and not keep:
                keep.append(m)
        return run

    shared_keep, private_keep = [], []
    into(mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, shared_keep)()
    into(mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, private_keep)()
    add("snapshot memory, 2048 copies", bench({"shared anonymous (shmem)": into(mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, shared_keep),
                                               "private anonymous (torchckpt)": into(mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, private_keep),
                                               "fresh private mapping every time": into(mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, None)},
                                              repeats=5))

    data = tmp / "h.bin"
    with open(data, "wb") as f:
        f.write(os.urandom(SIZE))
    buf = bytearray(16 * MiB)

    def read_hash():
        h, view = xxhash.xxh3_128(), memoryview(buf)
        with open(data, "rb", buffering=0) as f:
            while n := f.readinto(view):
                h.update(view[:n])

    add("checksum of 256 MiB (page cache)", bench({"mmap + xxh3 (torchckpt)": lambda: _fileio.checksum_file(data),
                                                   "read into a reused buffer + xxh3": read_hash}))
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    print(f"load average {os.getloadavg()}, torch {torch.__version__}")
    print("| what | variant | median s | min s |\n|---|---|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
