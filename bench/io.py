"""Benchmark the checkpoint storage layer (a script, not a test).

For each size, on a synthetic sharded safetensors checkpoint that the script generates
in a temporary directory, it measures in one run:

1. ``pipeline``: open the checkpoint with ``open_checkpoint`` and write it back with
   ``copy_checkpoint`` and ``ShardedWriter`` (sha256 per shard, create-only writes);
2. ``raw``: a plain fsspec copy of the same files: ``fs.open`` for reading and writing,
   in 64 MiB blocks, no hashing and no parsing;

on ``file://`` and on ``s3://`` (a moto server that the script starts in its own
process on 127.0.0.1), and

3. ``naive``: ``torch.load`` of the same weights saved as one ``.pt`` file, then
   ``torch.save`` (local disk only). It is skipped when the machine has less than 1.5x
   the checkpoint size of available memory, because it keeps every tensor in memory.

Each measurement runs in a fresh subprocess that imports torch and ``pipeline.storage``
before its clock starts. It reports its wall time and its peak RSS (``VmHWM`` on Linux,
else ``ru_maxrss``; interpreter and torch imports count). Runs alternate between raw
and pipeline, and the table keeps the fastest of ``--repeat`` runs of each, because
page-cache write speed on a shared machine varies several-fold from run to run. The
1-minute load average is printed with each run. The table gives throughput
as bytes of the source checkpoint per second, and the pipeline's throughput as a ratio
of the raw copy's on the same backend.

Usage::

    python bench/io.py [--sizes 4,16] [--quick] [--backends file,s3] [--workdir DIR]

Sizes are in GB (10**9 bytes). ``--quick`` runs one 0.5 GB checkpoint. Targets: the
pipeline reaches at least 0.9x the raw copy's throughput, and its peak RSS stays flat
across sizes at no more than 1.5 GB.

Disk: a size of N GB needs about 3N GB free in the work directory for the source, one
output at a time and the ``.pt`` pair of the naive run. Benchmarking ``s3`` needs 2N GB
more for the moto server's temporary files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GB = 10**9
MIB = 2**20
BLOCK_BYTES = 64 * MIB
SHARD_BYTES = 10**9
BUCKET = "bench"
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret"}


# -- synthetic checkpoint ---------------------------------------------------------


def synthetic_specs(total_bytes: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """Tensor specs of a transformer-like model of about ``total_bytes`` bytes.

    One bf16 embedding table of an eighth of the size, then layers of four 32 MiB
    attention matrices, two 128 MiB MLP matrices and two small fp32 norms, until the
    size is reached.
    """
    hidden = 4096
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    rows = max(1, total_bytes // 8 // (hidden * 2))
    specs.append(("embed.weight", "bfloat16", (rows, hidden)))
    remaining = total_bytes - rows * hidden * 2
    layer = 0
    while remaining > 0:
        for name, shape in (
            ("attn.q", (hidden, hidden)),
            ("attn.k", (hidden, hidden)),
            ("attn.v", (hidden, hidden)),
            ("attn.o", (hidden, hidden)),
            ("mlp.up", (4 * hidden, hidden)),
            ("mlp.down", (hidden, 4 * hidden)),
        ):
            if remaining <= 0:
                break
            rows = min(shape[0], max(1, remaining // (shape[1] * 2)))
            specs.append((f"layers.{layer}.{name}", "bfloat16", (rows, shape[1])))
            remaining -= rows * shape[1] * 2
        specs.append((f"layers.{layer}.norm1", "float32", (hidden,)))
        specs.append((f"layers.{layer}.norm2", "float32", (hidden,)))
        remaining -= 2 * hidden * 4
        layer += 1
    return specs


def _pool() -> Any:
    import torch

    return torch.randint(0, 256, (BLOCK_BYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _synthetic_blocks(pool: Any, dtype: Any, shape: tuple[int, ...]) -> list[Any]:
    """Row blocks of at most 64 MiB whose bytes repeat a random pool; no tensor is materialized."""
    import torch

    row_bytes = max(1, int(torch.tensor([], dtype=dtype).element_size()) * (shape[1] if len(shape) > 1 else 1))
    if len(shape) == 1:
        return [pool[: shape[0] * row_bytes].view(dtype)]
    rows_per_block = max(1, BLOCK_BYTES // row_bytes)
    blocks = []
    for start in range(0, shape[0], rows_per_block):
        rows = min(rows_per_block, shape[0] - start)
        blocks.append(pool[: rows * row_bytes].view(dtype).reshape(rows, shape[1]))
    return blocks


def generate_checkpoint(directory: Path, total_bytes: int) -> None:
    import torch

    from pipeline.storage import ShardedWriter, TensorSpec

    pool = _pool()
    specs = [TensorSpec(n, getattr(torch, d), s) for n, d, s in synthetic_specs(total_bytes)]
    writer = ShardedWriter(str(directory), max_shard_bytes=SHARD_BYTES)
    plan = writer.plan_shards(specs)
    records = [
        writer.write_shard(shard, lambda spec: _synthetic_blocks(pool, spec.dtype, spec.shape)) for shard in plan
    ]
    writer.write_index(plan, records)


def generate_pt(path: Path, total_bytes: int) -> None:
    """Save the same weights as one ``torch.save`` file, as a user of ``.pt`` files would."""
    import torch

    pool = _pool()
    state = {}
    for name, dtype, shape in synthetic_specs(total_bytes):
        state[name] = torch.cat(_synthetic_blocks(pool, getattr(torch, dtype), shape))
    torch.save(state, path)


# -- measured operations, each run in its own subprocess -----------------------------


def job_pipeline(source: str, destination: str, options: dict[str, Any]) -> dict[str, Any]:
    from pipeline.storage import ShardedWriter, copy_checkpoint, open_checkpoint

    started = time.perf_counter()
    reader = open_checkpoint(source, options)
    result = copy_checkpoint(reader, ShardedWriter(destination, options, max_shard_bytes=SHARD_BYTES))
    seconds = time.perf_counter() - started
    copied = open_checkpoint(destination, options)
    listing = [(i.name, i.dtype, i.shape) for i in reader.tensors.values()]
    if [(i.name, i.dtype, i.shape) for i in copied.tensors.values()] != listing:
        raise RuntimeError(f"{destination} lists different tensors than {source}")
    return {"seconds": seconds, "bytes": sum(r.size for r in result.records)}


def job_raw(source: str, destination: str, options: dict[str, Any]) -> dict[str, Any]:
    import fsspec

    started = time.perf_counter()
    fs, source_path = fsspec.core.url_to_fs(source, **options)
    _, destination_path = fsspec.core.url_to_fs(destination, **options)
    fs.makedirs(destination_path, exist_ok=True)
    copied = 0
    for path in sorted(fs.find(source_path)):
        target = destination_path.rstrip("/") + "/" + path[len(source_path) :].lstrip("/")
        # cache_type="none" makes every read(n) one request for exactly n bytes.
        with fs.open(path, "rb", block_size=BLOCK_BYTES, cache_type="none") as reader:
            with fs.open(target, "wb", block_size=BLOCK_BYTES) as writer:
                while chunk := reader.read(BLOCK_BYTES):
                    writer.write(chunk)
                    copied += len(chunk)
    return {"seconds": time.perf_counter() - started, "bytes": copied}


def job_naive(source: str, destination: str, options: dict[str, Any]) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    state = torch.load(source, weights_only=True)
    torch.save(state, destination)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": os.path.getsize(source)}


JOBS = {"pipeline": job_pipeline, "raw": job_raw, "naive": job_naive}


def run_job(method: str, source: str, destination: str, options: dict[str, Any]) -> dict[str, Any]:
    """Run one measured operation in a fresh Python process and return its report."""
    spec = json.dumps({"method": method, "source": source, "destination": destination, "options": options})
    completed = subprocess.run(
        [sys.executable, __file__, "--job", spec],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **DUMMY_CREDENTIALS},
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{method} job failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """Peak resident memory of this process.

    Linux keeps ``ru_maxrss`` across ``execve``, so a child started by this script
    would report the script's own peak. ``VmHWM`` belongs to the process image and
    starts fresh at exec, so it is used where available.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def job_main(spec_text: str) -> None:
    # Every job imports torch and the storage package before its clock starts, so raw and
    # pipeline runs happen in the same kind of process. On the 2-core benchmark machine,
    # page-cache writes from a process with torch loaded were measurably slower.
    import pipeline.storage  # noqa: F401

    spec = json.loads(spec_text)
    report = JOBS[spec["method"]](spec["source"], spec["destination"], spec["options"])
    report["peak_rss"] = peak_rss_bytes()
    print(json.dumps(report))


# -- moto server ------------------------------------------------------------------


def start_moto(temp_dir: Path) -> tuple[subprocess.Popen, str]:
    """Start a moto S3 server on a free loopback port, in its own process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, **DUMMY_CREDENTIALS, "TMPDIR": str(temp_dir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return process, endpoint
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"moto server did not start on {endpoint} within 60 s") from None
            time.sleep(0.2)


def s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


# -- driver -------------------------------------------------------------------------


def _flush_page_cache_writes() -> None:
    # Dirty pages of one run would otherwise be written back during the next one.
    os.sync()


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def bench_size(
    size_gb: float, backends: list[str], workdir: Path, *, naive: bool, repeat: int
) -> list[dict[str, Any]]:
    """Run every measurement for one checkpoint size and return one report per run."""
    import fsspec

    total = int(size_gb * GB)
    root = Path(tempfile.mkdtemp(prefix=f"bench-io-{size_gb}gb-", dir=workdir))
    rows: list[dict[str, Any]] = []
    try:
        source = root / "source"
        print(f"[{size_gb} GB] generating {source}", flush=True)
        generate_checkpoint(source, total)
        source_bytes = sum(p.stat().st_size for p in source.iterdir())

        def record(backend: str, method: str, report: dict[str, Any]) -> None:
            load = os.getloadavg()[0]
            report.update(size_gb=size_gb, backend=backend, method=method, source_bytes=source_bytes, load=load)
            rows.append(report)
            print(
                f"[{size_gb} GB] {backend:5} {method:8} {report['seconds']:7.1f} s  "
                f"peak RSS {report['peak_rss'] / GB:.2f} GB  load {load:.1f}",
                flush=True,
            )

        if "file" in backends:
            for _ in range(repeat):
                for method in ("raw", "pipeline"):
                    output = root / f"out-{method}"
                    _flush_page_cache_writes()
                    record("file", method, run_job(method, str(source), str(output), {}))
                    shutil.rmtree(output)

        available = _available_memory()
        if naive and available is not None and total * 1.5 > available:
            # torch.load keeps every tensor in memory, and so does generating the file.
            print(
                f"[{size_gb} GB] naive: skipped, it needs about {total * 1.5 / GB:.0f} GB of free "
                f"memory and {available / GB:.0f} GB are available",
                flush=True,
            )
        elif naive:
            pt_in, pt_out = root / "weights.pt", root / "weights-out.pt"
            print(f"[{size_gb} GB] generating {pt_in}", flush=True)
            subprocess.run(
                [sys.executable, __file__, "--make-pt", str(pt_in), str(total)], check=True, cwd=ROOT
            )
            _flush_page_cache_writes()
            record("file", "naive", run_job("naive", str(pt_in), str(pt_out), {}))
            pt_in.unlink()
            pt_out.unlink()

        if "s3" in backends:
            moto_tmp = root / "moto-tmp"
            moto_tmp.mkdir()
            process, endpoint = start_moto(moto_tmp)
            try:
                options = s3_options(endpoint)
                fs = fsspec.filesystem("s3", **options)
                fs.call_s3("create_bucket", Bucket=BUCKET)
                print(f"[{size_gb} GB] uploading the source to {endpoint}", flush=True)
                fs.put(str(source) + "/", f"{BUCKET}/source/", recursive=True)
                for _ in range(repeat):
                    for method in ("raw", "pipeline"):
                        output = f"s3://{BUCKET}/out-{method}"
                        record("s3", method, run_job(method, f"s3://{BUCKET}/source", output, options))
                        fs.rm(output, recursive=True)
            finally:
                process.terminate()
                process.wait(timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def fastest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the fastest run of each (size, backend, method), with the highest peak RSS seen."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        key = (r["size_gb"], r["backend"], r["method"])
        peak = max(r["peak_rss"], best[key]["peak_rss"]) if key in best else r["peak_rss"]
        if key not in best or r["seconds"] < best[key]["seconds"]:
            best[key] = dict(r)
        best[key]["peak_rss"] = peak
    return list(best.values())


def print_table(rows: list[dict[str, Any]]) -> None:
    rows = fastest(rows)
    raw = {(r["size_gb"], r["backend"]): r for r in rows if r["method"] == "raw"}
    header = f"{'size':>6} {'backend':7} {'method':8} {'time s':>8} {'GB/s':>6} {'vs raw':>7} {'peak RSS GB':>12}"
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        throughput = r["source_bytes"] / r["seconds"] / GB
        baseline = raw.get((r["size_gb"], r["backend"]))
        if r["method"] == "naive" or baseline is None:
            ratio = "-"
        else:
            ratio = f"{(r['source_bytes'] / r['seconds']) / (baseline['source_bytes'] / baseline['seconds']):.2f}x"
        print(
            f"{r['size_gb']:>5g}G {r['backend']:7} {r['method']:8} {r['seconds']:8.1f} "
            f"{throughput:6.2f} {ratio:>7} {r['peak_rss'] / GB:12.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4", help="comma-separated checkpoint sizes in GB (default: 4)")
    parser.add_argument("--quick", action="store_true", help="run one 0.5 GB checkpoint")
    parser.add_argument("--backends", default="file,s3", help="comma-separated: file, s3 (default: both)")
    parser.add_argument("--no-naive", action="store_true", help="skip the torch.load/torch.save run")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of raw and pipeline per backend; the table keeps the fastest (default: 2)"
    )
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="directory for temporary checkpoints")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--make-pt", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.job:
        job_main(args.job)
        return
    if args.make_pt:
        generate_pt(Path(args.make_pt[0]), int(args.make_pt[1]))
        return

    sizes = [0.5] if args.quick else [float(s) for s in args.sizes.split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"file", "s3"}
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; expected file and/or s3")
    sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for size in sizes:
        rows += bench_size(size, backends, Path(args.workdir), naive=not args.no_naive, repeat=args.repeat)
    print_table(rows)
    print(
        f"\ntotal wall time {time.perf_counter() - started:.0f} s on {os.cpu_count()} CPUs; "
        f"1-minute load average at the end {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
