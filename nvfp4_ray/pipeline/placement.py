"""Where the work runs: one placement-group bundle per layer worker.

A bundle is one GPU and one CPU on GPU clusters, or a node's CPUs on CPU-only clusters;
the worker takes all of it. Reads and writes are zero-CPU tasks pinned to a node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from nvfp4_ray.errors import InputError, JobError


# How long a release waits for the group to be placed: placing it on nodes that are up takes
# milliseconds; one that waits for the autoscaler to add nodes has no bundle reserved yet.
RELEASE_WAIT_S = 5.0


@dataclass
class Placement:
    group: object
    count: int  # bundles, one worker each
    gpu: bool
    worker_cpus: float
    bundle: dict
    cluster: str  # what the cluster had when the bundles were asked for (for errors)
    nodes: list[str] = field(default_factory=list)  # node id of each bundle, once placed
    object_store_bytes: float = 0  # the smallest object store among the bundles' nodes

    @classmethod
    def request(cls, num_workers: int | None, device: str = "auto") -> "Placement":
        """Ask for the bundles; ``wait`` until they are placed. ``device``: "gpu" asks for
        GPU bundles even if no GPU node is up yet (the autoscaler adds them while the
        placement group waits); "auto" sizes to the GPUs present now, falling back to CPU
        workers on a cluster without GPUs."""
        alive = [node for node in ray.nodes() if node.get("Alive")]
        gpus = sum(int(node["Resources"].get("GPU", 0)) for node in alive)
        cpus = [node["Resources"].get("CPU", 0) for node in alive]
        use_gpu = device == "gpu" or (device == "auto" and gpus > 0)
        if use_gpu:
            count = num_workers or gpus
            if not count:
                raise InputError("--worker-device gpu on a cluster with no GPU node up yet needs --num-workers")
            if count > gpus and device == "auto":
                raise InputError(
                    f"--num-workers {count} asks for more GPUs than the cluster has ({gpus}); "
                    "pass --worker-device gpu to wait for the autoscaler to add GPU nodes"
                )
            bundle = {"CPU": 1, "GPU": 1}
        else:
            count = num_workers or len([c for c in cpus if c >= 2]) or 1
            per_bundle = max(2, int(sum(cpus) // count))
            bundle = {"CPU": per_bundle}
        group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
        return cls(group, count, use_gpu, bundle["CPU"], bundle, f"{gpus} GPUs, CPUs per node {cpus}")

    @staticmethod
    def fits_now(num_workers: int | None, device: str) -> bool:
        """Whether the bundles ``request`` would ask for exist now: no autoscaling needed."""
        if device != "gpu":
            return True  # "auto" sizes to what is there; CPU bundles never wait for new nodes
        gpus = sum(int(node["Resources"].get("GPU", 0)) for node in ray.nodes() if node.get("Alive"))
        return 0 < (num_workers or gpus) <= gpus

    def wait(self, timeout_s: float) -> None:
        ready, _ = ray.wait([self.group.ready()], timeout=timeout_s)
        if not ready:
            raise JobError(
                f"the cluster could not place {self.count} workers of {self.bundle} each within "
                f"{timeout_s:.0f}s (cluster then: {self.cluster})"
            )
        table = placement_group_table(self.group)["bundles_to_node_id"]
        self.nodes = [table[i] for i in range(self.count)]
        stores = {node["NodeID"]: node["Resources"].get("object_store_memory", 0) for node in ray.nodes()}
        self.object_store_bytes = min(stores.get(node, 0) for node in self.nodes)

    @property
    def size(self) -> int:
        return self.count

    def _in_bundle(self, index: int) -> dict:
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index)}

    def worker_options(self, index: int) -> dict:
        return {"num_cpus": self.worker_cpus, "num_gpus": 1 if self.gpu else 0, **self._in_bundle(index)}

    @staticmethod
    def on_node(node_id: str) -> dict:
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}

    def release(self) -> None:
        """Remove the placement group, and with it the workers in its bundles: once it is
        placed, where that takes a moment (RELEASE_WAIT_S). Ray 2.60 loses, for good, the
        resources of a group removed while its bundles are still being reserved: a local
        instance was left with 0 of its 2 CPUs free after about 1 in 35 removals made right
        after the request (what a bad input found early does), and every later job on it
        waited out its placement timeout. Removed once placed, 250 in a row left none lost."""
        ray.wait([self.group.ready()], timeout=RELEASE_WAIT_S)
        remove_placement_group(self.group)
