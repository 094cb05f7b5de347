"""Check that a checkpoint copied through the pipeline's reader and writer is byte-identical.

Generates a synthetic sharded checkpoint (4 GB by default, with ``bench/io.py``'s
generator), copies it with ``copy_checkpoint`` on ``file://``, and compares every shard
and the index file by sha256, and the sha256 that the writer reported for each shard.
Exits 1 when anything differs.

Usage::

    python bench/roundtrip.py [--gb 4] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path



def _bench_io():
    """Load bench/io.py by path: its module name would shadow the standard library's io."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_io", Path(__file__).resolve().parent / "io.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(16 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.0, help="checkpoint size in GB (default: 4)")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="folder for the two checkpoints")
    args = parser.parse_args()

    from pipeline.storage import ShardedWriter, copy_checkpoint, open_checkpoint

    bench_io = _bench_io()
    root = Path(tempfile.mkdtemp(prefix="roundtrip-", dir=args.workdir))
    try:
        source, copy = root / "source", root / "copy"
        bench_io.generate_checkpoint(source, int(args.gb * 1e9))
        started = time.perf_counter()
        reader = open_checkpoint(str(source))
        result = copy_checkpoint(reader, ShardedWriter(str(copy), max_shard_bytes=bench_io.SHARD_BYTES))
        seconds = time.perf_counter() - started

        names = sorted(p.name for p in source.iterdir())
        mismatches = []
        if names != sorted(p.name for p in copy.iterdir()):
            mismatches.append(f"file lists differ: {names} vs {sorted(p.name for p in copy.iterdir())}")
        for name in names:
            if (copy / name).exists() and sha256_of(source / name) != sha256_of(copy / name):
                mismatches.append(f"{name}: sha256 differs")
        for record in result.records:
            if record.sha256 != sha256_of(copy / record.file):
                mismatches.append(f"{record.file}: the writer reported {record.sha256}, the file hashes differently")
        total = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        print(f"copied {total / 1e9:.2f} GB in {len(result.records)} shards in {seconds:.1f} s")
        if mismatches:
            print("NOT identical:\n  " + "\n  ".join(mismatches))
            return 1
        print(f"byte-identical: {len(names)} files, every sha256 equal, writer digests match")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
