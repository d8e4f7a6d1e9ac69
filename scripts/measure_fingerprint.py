"""Cost of the manifest's large-file fingerprint (contract/manifest.py `fingerprint_file`) on an 8B-sized file.

    python scripts/measure_fingerprint.py                    # a 16 GB sparse file in $TMPDIR (no disk used)
    python scripts/measure_fingerprint.py /path/model.safetensors --full   # a real file, and its full sha256

Prints the seconds one fingerprint takes (cold and warm), and with --full the seconds of the full sha256 the
manifest also records (computed once per inode/size/mtime/ctime: see HashCache).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from eksft_pipeline.contract.manifest import fingerprint_file, sha256_file

SIZE_8B = 16 * 10**9  # Qwen3-8B in bf16: 8.2e9 parameters x 2 bytes


def _drop_cache(path: Path) -> None:
    try:  # best effort: ask the kernel to forget the file's pages (a "cold" read)
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except (OSError, AttributeError):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", help="a real file (default: a 16 GB sparse file, removed afterwards)")
    ap.add_argument("--full", action="store_true", help="also time the full sha256")
    args = ap.parse_args()
    tmp = None
    if args.path:
        path = Path(args.path)
    else:
        tmp = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
        tmp.truncate(SIZE_8B)
        tmp.close()
        path = Path(tmp.name)
    try:
        size = path.stat().st_size
        _drop_cache(path)
        t0 = time.perf_counter()
        fp = fingerprint_file(path)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        fingerprint_file(path)
        warm = time.perf_counter() - t0
        print(f"file {path} ({size / 1e9:.1f} GB{', sparse' if tmp else ''})")
        print(f"fingerprint {fp[:20]}...: {cold * 1000:.1f} ms cold, {warm * 1000:.1f} ms warm")
        if args.full:
            _drop_cache(path)
            t0 = time.perf_counter()
            sha256_file(path)
            full = time.perf_counter() - t0
            print(f"full sha256: {full:.1f} s ({size / full / 1e9:.2f} GB/s)")
    finally:
        if tmp is not None:
            os.unlink(tmp.name)


if __name__ == "__main__":
    main()
