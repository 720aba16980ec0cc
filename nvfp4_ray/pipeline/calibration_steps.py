"""The calibration workers' state, from the driver (Execution inherits CalibrationSteps).

Before the first layer: the embedding read for the calibration workers' nodes, where
calibration resumes (resume_point: the last layer with statistics at DEST, the last
complete hidden-state snapshot before it), and each worker's batches embedded, or the
snapshot's hidden states restored (from layer 0 if a file of it is damaged). After each
layer: the workers' input amax max-reduced (exact: max is order-free) and persisted,
and the hidden-state snapshots they finished taken in. A worker's stand-in is caught up
with the same steps (Execution._replace_worker).

It uses the Execution's plan, config, dest, placement, events, workers, flow, persist,
layer_amax and calibration_workers, and its ``_get`` and ``_wait``.
"""

from __future__ import annotations

import json
import math
import time

from nvfp4_ray.calibration.batches import deal, make_batches
from nvfp4_ray.pipeline.calibration_state import CALIBRATION_DIR, Calibration, resume_point
from nvfp4_ray.pipeline.plan import calibration_keys, snapshot_layers


class CalibrationSteps:
    def _read_embeddings(self) -> dict:
        """The embedding, for the calibration workers' nodes: read into their object stores,
        or (a local SOURCE) into their page caches, before any layer, for the workers to read."""
        if not self.calibration_workers:
            return {}
        embed = self.plan.source.tensors[self.plan.spec.embed_tensor]
        nodes = dict.fromkeys(self.placement.nodes[: self.calibration_workers])
        for node in nodes:
            self.flow.read_into_page_cache(node, [embed])
        return {node: self.flow.tensors_on(node, [embed]) for node in nodes}

    def _prepare_calibration(self, infos: list[dict], embeds: dict) -> Calibration:
        """Where calibration resumes, the samples embedded (or the hidden states of the last
        snapshot restored) on every calibration worker, and the layer flow started."""
        plan = self.plan
        batches = make_batches(plan.samples, self.config.batch_tokens)
        signature = "+".join(sorted({info["signature"] for info in infos}))
        keys = calibration_keys(plan, signature)
        first, checkpoint = resume_point(self.dest, keys, self.layer_amax)
        calibration = Calibration(
            shares=self._shares(batches),
            keys=keys,
            first=first,
            checkpoint=checkpoint,
            done_through=first - 1,
            devices=[info["device"] for info in infos],
            kept=set(snapshot_layers(len(keys), self.config.hidden_snapshots)),
        )
        self.calibration = calibration
        workers = range(self.calibration_workers)
        if first == len(keys):
            self.events.info("calibration statistics for every layer already at DEST: skipping calibration")
            self.flow.start(self.workers, first)
            return calibration
        if checkpoint is None:  # the first layers' loads (copies to the device, quantization) go on meanwhile
            self.flow.start(self.workers, first)
        else:
            self.events.info(f"resuming calibration at layer {first} from persisted state", layer=first)
        began = time.monotonic()
        self._start_calibration(calibration, workers, embeds, pump=checkpoint is None)
        self.events.info("calibration batches embedded", seconds=round(time.monotonic() - began, 3))
        if checkpoint is not None:
            if not self._restore_snapshot(calibration, workers):
                calibration.checkpoint, calibration.first, calibration.done_through = None, 0, -1
                self._start_calibration(calibration, workers, embeds)  # the workers that restored theirs, too
            self.flow.start(self.workers, calibration.first)
        return calibration

    def _shares(self, batches: list) -> list[list]:
        """The batches of each calibration worker."""
        return deal(batches, self.calibration_workers)

    def _start_calibration(self, calibration: Calibration, indices, embeds: dict, pump: bool = False) -> None:
        """Embed the batches of calibration workers ``indices``; ``pump``: drive the layer flow
        meanwhile, so that the first layers load beside the embedding."""
        embed = self.plan.source.tensors[self.plan.spec.embed_tensor]
        starts = []
        for i in indices:
            node = self.placement.nodes[i]
            if node not in embeds:  # a replaced worker on another node
                embeds[node] = self.flow.tensors_on(node, [embed])
            starts.append(self.workers[i].start.remote(calibration.shares[i], embeds[node], embed.name))
        tokens = self._get(self._wait(starts) if pump else starts)
        calibration.tokens = max(calibration.tokens, sum(tokens))

    def _restore_snapshot(self, calibration: Calibration, indices) -> bool:
        """Workers ``indices`` take the hidden states after layer calibration.checkpoint from
        DEST; False (with a warning) if a file of them is damaged: a worker that finds one
        restores nothing, and the caller calibrates from layer 0."""
        folder = calibration.folder(calibration.checkpoint)
        if all(self._get([self.workers[i].load_hidden.remote(self.config.dest, folder) for i in indices])):
            return True
        self.events.warning(
            f"the hidden states at DEST/{folder} are damaged (a file is missing or differs from the digest in its "
            "_COMPLETE marker): calibrating from layer 0 instead"
        )
        return False

    def _finish_layer(self, index: int, amax_results: list[dict], snapshot: str | None, snapshot_results: list[dict]) -> None:
        """Layer ``index`` calibrated: the workers' amax max-reduced (exact: max is
        order-free) and persisted, and the hidden-state snapshots they finished taken in."""
        calibration = self.calibration
        reduced = {}
        for local in self.plan.record_sets()[index]:
            values = [result["amax"][local] for result in amax_results if local in result["amax"]]
            reduced[local] = math.nan if any(math.isnan(v) for v in values) else max(values)
        self.layer_amax[index] = reduced
        self.persist(self.dest.write_text, f"{CALIBRATION_DIR}/{calibration.keys[index]}.json", json.dumps(reduced, sort_keys=True))
        calibration.layer_done(index, snapshot, self.calibration_workers)
        done = [done for result in snapshot_results for done in result["snapshots"]]
        calibration.snapshots_done(done, self.dest, self.persist)

    def _finish_snapshots(self) -> None:
        finished = self._get([w.flush_snapshots.remote() for w in self.workers[: self.calibration_workers]])
        self.calibration.snapshots_done([done for worker in finished for done in worker], self.dest, self.persist)
        self.persist.finish()

    def calibration_record(self) -> dict | None:
        """The manifest's calibration part (Calibration.record)."""
        if self.calibration is None:
            return None
        return self.calibration.record(self.plan.layer_units, self.layer_amax, self.dest)
