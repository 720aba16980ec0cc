"""Scheduled re-quantization: --if-changed skips unchanged inputs, redoes only what a
changed input affects, and always ends byte-identical to a fresh run on the new source;
earlier versions stay restorable."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
from conftest import quantize, run_cli
from reference import load_tensors
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.usefixtures("ray_instance")


@pytest.fixture
def source(family_case, tmp_path):
    case = family_case("llama")
    folder = str(tmp_path / "source")
    shutil.copytree(case.source, folder)
    return folder, case.calibration


def run(source_dir: str, dest: str, calibration: str, **options) -> dict:
    return quantize(source_dir, dest, calibration, if_changed=True, **options)


@pytest.fixture(scope="module")
def first_run(family_case, tmp_path_factory, ray_instance):
    """The llama case's source and a first run over it (the default options), made once for
    the tests below that start from it: a job is seconds of worker start-up on CI."""
    case = family_case("llama")
    folder = tmp_path_factory.mktemp("requantize-first-run")
    source_dir, dest = str(folder / "source"), str(folder / "dest")
    shutil.copytree(case.source, source_dir)
    return source_dir, dest, run(source_dir, dest, case.calibration)


@pytest.fixture
def quantized(first_run, family_case, tmp_path):
    """A copy of the source and of the first run's DEST for one test: (source folder, DEST,
    calibration file, the first run's summary). copytree keeps every file's mtime, so the
    copies have the identities (size and mtime) the first run recorded."""
    source_dir, dest = str(tmp_path / "source"), str(tmp_path / "dest")
    shutil.copytree(first_run[0], source_dir)
    shutil.copytree(first_run[1], dest)
    return source_dir, dest, family_case("llama").calibration, first_run[2]


def index_files(dest: str) -> list[str]:
    return sorted(set(json.load(open(os.path.join(dest, "model.safetensors.index.json")))["weight_map"].values()))


def assert_same_as_fresh(dest: str, source_dir: str, calibration: str, fresh: str, **options) -> None:
    quantize(source_dir, fresh, calibration, **options)
    assert index_files(dest) == index_files(fresh)
    assert load_tensors(dest) == load_tensors(fresh)
    for name in ("config.json", "recipe.yaml", "model.safetensors.index.json"):
        assert open(os.path.join(dest, name)).read() == open(os.path.join(fresh, name)).read()


def change_tensor(source_dir: str, tensor: str) -> set[str]:
    """Rewrite the shard holding ``tensor`` with new values for it; return that shard's tensors."""
    index = json.load(open(os.path.join(source_dir, "model.safetensors.index.json")))["weight_map"]
    path = os.path.join(source_dir, index[tensor])
    tensors = load_file(path)
    tensors[tensor] = (tensors[tensor].float() * 1.5).to(tensors[tensor].dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return set(tensors)


def test_unchanged_inputs_are_skipped(quantized, tmp_path):
    """...without starting a worker: on a running Ray instance workers usually start while
    the inputs are read, but not for an --if-changed run over a committed checkpoint."""
    from ray.util import placement_group_table

    source_dir, dest, calibration, first = quantized
    stamps = {name: os.stat(os.path.join(dest, name)).st_mtime_ns for name in os.listdir(dest)}
    groups = set(placement_group_table())
    again = run(source_dir, dest, calibration)
    assert set(placement_group_table()) == groups, "a placement group was asked for"
    assert again["status"] == "unchanged" and again["version"] == first["version"]
    assert {name: os.stat(os.path.join(dest, name)).st_mtime_ns for name in os.listdir(dest)} == stamps
    code, stdout, _ = run_cli("quantize", source_dir, dest, "--calibration", calibration, "--num-samples", "6",
                              "--max-seq-len", "64", "--if-changed")  # fmt: skip
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["status"] == "unchanged"


def test_a_changed_shard_redoes_only_what_depends_on_it(quantized, tmp_path):
    source_dir, dest, calibration, _ = quantized
    changed = change_tensor(source_dir, "model.layers.1.mlp.down_proj.weight")
    changed_layers = {int(name.split(".")[2]) for name in changed if name.startswith("model.layers.")}
    summary = run(source_dir, dest, calibration)
    assert summary["status"] == "succeeded"
    # the layer units that hold changed tensors, and the input scales (layer 1's weights changed)
    assert summary["units_computed"] == len(changed_layers) + 1
    assert summary["units_reused"] == 3 - len(changed_layers) + 1  # other layers + the copy unit
    assert_same_as_fresh(dest, source_dir, calibration, str(tmp_path / "fresh"))


def test_a_unit_file_altered_at_dest_is_written_again(quantized, tmp_path):
    """A unit file whose bytes changed after its completion record (same size) is not
    reused by the next run."""
    source_dir, dest, calibration, _ = quantized
    changed = change_tensor(source_dir, "model.layers.1.mlp.down_proj.weight")
    changed_layers = {int(name.split(".")[2]) for name in changed if name.startswith("model.layers.")}
    (other,) = [layer for layer in range(3) if layer not in changed_layers][:1]
    weight_map = json.load(open(os.path.join(dest, "model.safetensors.index.json")))["weight_map"]
    altered = os.path.join(dest, weight_map[f"model.layers.{other}.mlp.down_proj.weight_packed"])
    with open(altered, "r+b") as handle:  # the last byte of the file, inside tensor data
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))
    summary = run(source_dir, dest, calibration)
    assert summary["units_computed"] == len(changed_layers) + 1 + 1  # + the input scales + the altered unit
    assert_same_as_fresh(dest, source_dir, calibration, str(tmp_path / "fresh"))


def snapshot_folders(dest: str) -> set[str]:
    folder = os.path.join(dest, ".nvfp4", "calibration")
    return {name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name))}


def test_a_damaged_snapshot_is_not_used(quantized, tmp_path):
    """Snapshot files are not fsynced; the marker holds each file's sha256. A file that
    differs (as after a power loss) makes the re-run calibrate from layer 0, with a warning,
    and the result is still the fresh run's."""
    source_dir, dest, calibration, _ = quantized  # the first run kept the default 3 snapshots
    kept = json.load(open(os.path.join(dest, "manifest.json")))["calibration"]["snapshots"]
    folder = os.path.join(dest, ".nvfp4", "calibration", kept[-1])
    digests = json.load(open(os.path.join(folder, "_COMPLETE")))
    batches = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    assert sorted(digests) == batches and len(batches) > 1
    with open(os.path.join(folder, batches[-1]), "r+b") as handle:
        handle.seek(-2, os.SEEK_END)
        handle.write(b"\x00\x7f")
    change_tensor(source_dir, "model.layers.2.mlp.down_proj.weight")
    events = io.StringIO()
    summary = run(source_dir, dest, calibration, events=events, hidden_snapshots=3)
    warnings = [e["message"] for e in map(json.loads, events.getvalue().splitlines()) if e["event"] == "warning"]
    assert summary["calibration_first_layer"] == 0
    assert any(f"{kept[-1]} are damaged" in message and "calibrating from layer 0" in message for message in warnings), warnings
    assert_same_as_fresh(dest, source_dir, calibration, str(tmp_path / "fresh"))


def test_calibration_resumed_past_the_layers_read_during_setup_still_reads_its_layers(quantized, tmp_path):
    """A read-ahead budget below one layer: only layers 0 and 1 are read while the workers
    start. Calibration then resumes at layer 2 (changed), and the layers left to do are
    fewer than those first planned: layer 2 must still be read, not skipped (the job hung
    waiting for it). The run is watched from a thread so that a hang fails the test."""
    import threading

    source_dir, dest, calibration, _ = quantized
    change_tensor(source_dir, "model.layers.2.mlp.down_proj.weight")
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(summary=run(source_dir, dest, calibration, prefetch_gib=1e-6)), daemon=True
    )
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the re-run never finished: a layer to calibrate was never read"
    assert result["summary"]["calibration_first_layer"] == 2
    assert_same_as_fresh(dest, source_dir, calibration, str(tmp_path / "fresh"))


@pytest.mark.parametrize("snapshots", [3, 0])
def test_calibration_restarts_at_the_first_changed_layer(quantized, tmp_path, snapshots):
    """Hidden states kept after layers 0 and 1 (of 3): a change in layer 2 calibrates layer
    2 only, from the states after layer 1; without snapshots everything is calibrated again."""
    source_dir, dest, calibration, first = quantized  # made with the default, 3 snapshots
    if snapshots != 3:
        shutil.rmtree(dest)
        first = run(source_dir, dest, calibration, hidden_snapshots=snapshots)
    manifest = json.load(open(os.path.join(dest, "manifest.json")))
    assert snapshot_folders(dest) == set(manifest["calibration"]["snapshots"])
    assert len(manifest["calibration"]["snapshots"]) == min(snapshots, 2)
    changed = change_tensor(source_dir, "model.layers.2.mlp.down_proj.weight")
    assert {int(name.split(".")[2]) for name in changed if name.startswith("model.layers.")} == {2}  # that shard: layer 2 only
    summary = run(source_dir, dest, calibration, hidden_snapshots=snapshots)
    assert first["calibration_first_layer"] == 0
    assert summary["calibration_first_layer"] == (2 if snapshots else 0)
    assert summary["calibration_tokens"] == first["calibration_tokens"]  # every sample, through fewer layers
    manifest = json.load(open(os.path.join(dest, "manifest.json")))
    assert snapshot_folders(dest) == set(manifest["calibration"]["snapshots"])  # no stale hidden states left
    assert_same_as_fresh(dest, source_dir, calibration, str(tmp_path / "fresh"))


def test_an_ignore_list_change_redoes_the_layer_it_touches(quantized, tmp_path):
    source_dir, dest, calibration, _ = quantized
    ignore = ["lm_head", "model.layers.1.mlp.down_proj"]
    summary = run(source_dir, dest, calibration, ignore=ignore)
    assert summary["status"] == "succeeded"
    assert summary["units_computed"] == 2  # layer 1 (its down_proj stays bf16) and the input scales
    assert summary["calibration_first_layer"] == 1  # layer 1 records one Linear fewer; layer 0 is reused
    assert "model.layers.1.mlp.down_proj" in json.load(open(os.path.join(dest, "config.json")))["quantization_config"]["ignore"]
    assert_same_as_fresh(dest, source_dir, calibration, str(tmp_path / "fresh"), ignore=ignore)


def test_metadata_only_config_change_rewrites_config_only(quantized, tmp_path):
    source_dir, dest, calibration, _ = quantized
    before = {name: open(os.path.join(dest, name), "rb").read() for name in index_files(dest)}
    config_path = os.path.join(source_dir, "config.json")
    config = json.load(open(config_path))
    config["eos_token_id"] = 7
    json.dump(config, open(config_path, "w"), indent=2)
    summary = run(source_dir, dest, calibration)
    assert summary["units_computed"] == 0 and summary["calibration_tokens"] == 0  # no work, no calibration
    assert {name: open(os.path.join(dest, name), "rb").read() for name in index_files(dest)} == before
    assert json.load(open(os.path.join(dest, "config.json")))["eos_token_id"] == 7
    assert_same_as_fresh(dest, source_dir, calibration, str(tmp_path / "fresh"))


ROPE_FIXES = {
    # the rotary tables do not use it (default rope), vLLM does
    "max_position_embeddings": lambda config: {**config, "max_position_embeddings": 4096},
    # dynamic NTK scaling only recomputes the tables past max_position_embeddings (512):
    # calibration rows are at most 64 tokens here
    "dynamic_ntk": lambda config: {**config, "rope_parameters": {**config["rope_parameters"], "rope_type": "dynamic",
                                                                  "factor": 4.0}},
}  # fmt: skip


@pytest.mark.parametrize("fix", sorted(ROPE_FIXES))
def test_rope_fix_that_leaves_the_calibration_forward_alone_rewrites_config_only(quantized, tmp_path, fix):
    source_dir, dest, calibration, _ = quantized
    before = {name: open(os.path.join(dest, name), "rb").read() for name in index_files(dest)}
    config_path = os.path.join(source_dir, "config.json")
    config = ROPE_FIXES[fix](json.load(open(config_path)))
    json.dump(config, open(config_path, "w"), indent=2)
    summary = run(source_dir, dest, calibration)
    assert summary["status"] == "succeeded"
    assert summary["units_computed"] == 0 and summary["calibration_tokens"] == 0  # no work, no calibration
    assert {name: open(os.path.join(dest, name), "rb").read() for name in index_files(dest)} == before
    written = json.load(open(os.path.join(dest, "config.json")))
    for key in ("max_position_embeddings", "rope_parameters"):
        assert written[key] == config[key]
    assert_same_as_fresh(dest, source_dir, calibration, str(tmp_path / "fresh"))


def test_config_change_the_forward_uses_recalibrates_and_reuses_weights(quantized, tmp_path):
    source_dir, dest, calibration, _ = quantized
    config_path = os.path.join(source_dir, "config.json")
    config = json.load(open(config_path))
    config["rope_parameters"]["rope_theta"] = 500000.0
    json.dump(config, open(config_path, "w"), indent=2)
    summary = run(source_dir, dest, calibration)
    assert summary["calibration_tokens"] > 0  # rotary positions changed: calibration ran again
    assert summary["units_computed"] <= 1  # at most the input scales; every weight unit reused
    assert_same_as_fresh(dest, source_dir, calibration, str(tmp_path / "fresh"))


def test_rollback_restores_the_previous_version_and_retention_bounds_history(quantized, tmp_path):
    source_dir, dest, calibration, v1 = quantized
    v1_tensors, v1_config = load_tensors(dest), open(os.path.join(dest, "config.json")).read()
    change_tensor(source_dir, "model.layers.0.self_attn.q_proj.weight")
    with open(os.path.join(source_dir, "special_tokens_map.json"), "w") as handle:  # a file v1 did not have
        json.dump({"max_new_tokens": 64}, handle)
    v2 = run(source_dir, dest, calibration, retention=1)
    assert load_tensors(dest) != v1_tensors and os.path.exists(os.path.join(dest, "special_tokens_map.json"))

    code, stdout, stderr = run_cli("rollback", dest)
    assert code == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1]) == {
        "status": "rolled_back", "dest": dest, "version": v1["version"], "previous": v2["version"]
    }  # fmt: skip
    assert load_tensors(dest) == v1_tensors and open(os.path.join(dest, "config.json")).read() == v1_config
    assert not os.path.exists(os.path.join(dest, "special_tokens_map.json"))  # v1 had none
    assert json.load(open(os.path.join(dest, "manifest.json")))["version"] == v1["version"]

    # with retention 0 a new commit keeps nothing else; rolling back is then refused
    assert run_cli("rollback", dest, "--version", v2["version"])[0] == 0
    change_tensor(source_dir, "model.layers.2.mlp.up_proj.weight")
    run(source_dir, dest, calibration, retention=0)
    assert sorted(os.listdir(os.path.join(dest, ".nvfp4", "versions"))) != []
    assert len([n for n in os.listdir(os.path.join(dest, ".nvfp4", "versions")) if n.endswith(".json")]) == 1
    unit_files = sorted(n for n in os.listdir(dest) if n.endswith(".safetensors"))
    assert unit_files == index_files(dest)  # nothing left over from earlier versions
    code, _, stderr = run_cli("rollback", dest)
    assert code == 2 and "keeps no version older than" in stderr


def test_tensor_change_shows_in_the_output(quantized, tmp_path):
    """Guard for the tests above: changing a tensor does change what is written."""
    source_dir, dest_a, calibration, _ = quantized
    change_tensor(source_dir, "model.layers.1.mlp.down_proj.weight")
    dest_b = str(tmp_path / "b")
    quantize(source_dir, dest_b, calibration)
    a, b = load_tensors(dest_a), load_tensors(dest_b)
    assert a["model.layers.1.mlp.down_proj.weight_packed"] != b["model.layers.1.mlp.down_proj.weight_packed"]


def test_a_replace_cut_short_leaves_no_checkpoint_and_resumes(quantized, tmp_path, monkeypatch):
    """Between the new config.json and the new _SUCCESS, DEST must not claim a checkpoint."""
    from nvfp4_ray.errors import JobError
    from nvfp4_ray.pipeline import commit

    source_dir, dest, calibration, _ = quantized
    change_tensor(source_dir, "model.layers.1.mlp.down_proj.weight")

    def cut(*args, **kwargs):
        raise JobError("cut short before the manifest")

    with monkeypatch.context() as patch:
        patch.setattr(commit, "commit", cut)
        with pytest.raises(JobError):
            run(source_dir, dest, calibration)
    assert os.path.exists(os.path.join(dest, "config.json"))  # the new small files are there...
    assert not os.path.exists(os.path.join(dest, "_SUCCESS"))  # ...but no checkpoint is claimed
    assert run(source_dir, dest, calibration)["status"] == "succeeded"
    assert_same_as_fresh(dest, source_dir, calibration, str(tmp_path / "fresh"))


def test_overwrite_replaces_a_foreign_marker_and_if_changed_does_not(source, tmp_path):
    source_dir, calibration = source
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "_SUCCESS").write_text("")  # e.g. a Spark job's output, no manifest
    (dest / "part-00000").write_text("rows")
    code, _, stderr = run_cli("quantize", source_dir, str(dest), "--calibration", calibration, "--num-samples", "6",
                              "--max-seq-len", "64", "--if-changed")  # fmt: skip
    assert code == 2 and "pass --overwrite to replace it" in stderr
    assert quantize(source_dir, str(dest), calibration, overwrite=True)["status"] == "succeeded"
    assert (dest / "part-00000").read_text() == "rows"  # files nvfp4-ray did not write are never touched
    assert_same_as_fresh(str(dest), source_dir, calibration, str(tmp_path / "fresh"))


def test_a_software_upgrade_is_a_change(quantized, tmp_path, monkeypatch):
    """--if-changed must not answer "unchanged" after torch or transformers changed."""
    from nvfp4_ray.pipeline import plan

    source_dir, dest, calibration, _ = quantized
    # the module the planner reads: after tests/test_reliability.py, sys.modules holds another
    # transformers module object than the one the planner imported
    monkeypatch.setattr(plan.transformers, "__version__", "99.0.0")
    assert run(source_dir, dest, calibration)["status"] == "succeeded"
