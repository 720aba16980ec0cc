"""``nvfp4-ray export DEST TARGET``: exactly the committed checkpoint (no ``.nvfp4/``, no
other version's unit files), local and on a real S3 server; bad input refused before any
write; an export cut short is recognisable (no ``_SUCCESS``) and completed by the same command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from conftest import NUM_ROWS, run_cli

pytestmark = pytest.mark.usefixtures("ray_instance")


def files_under(folder: str) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> sha256)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def last_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dest(family_case, tmp_path_factory, ray_instance):
    """A DEST holding two versions, as the default --retention 1 leaves it: the second run
    ignores one more Linear, so the first version's unit file of that layer stays beside the
    current one. Both runs give an option between the positionals."""
    case = family_case("llama")
    folder = str(tmp_path_factory.mktemp("export") / "dest")
    common = ["--num-samples", str(NUM_ROWS), "--max-seq-len", "64"]
    code, _, stderr = run_cli("quantize", case.source, "--calibration", case.calibration, folder, *common)
    assert code == 0, stderr
    code, stdout, stderr = run_cli("quantize", case.source, "--ignore", "lm_head", "model.layers.1.mlp.down_proj",
                                   "--calibration", case.calibration, folder, "--if-changed", *common)  # fmt: skip
    assert code == 0 and last_line(stdout)["status"] == "succeeded", stderr
    return folder


def checkpoint_of(dest: str) -> dict[str, str]:
    """What an export of ``dest`` must hold: the manifest's files, manifest.json, _SUCCESS."""
    manifest = json.load(open(os.path.join(dest, "manifest.json")))
    wanted = {name: info["sha256"] for name, info in manifest["files"].items()}
    for name in ("manifest.json", "_SUCCESS"):
        wanted[name] = hashlib.sha256(open(os.path.join(dest, name), "rb").read()).hexdigest()
    return wanted


def test_export_copies_exactly_the_current_checkpoint(dest, tmp_path):
    at_dest = files_under(dest)
    target = str(tmp_path / "published")
    code, stdout, stderr = run_cli("export", dest, target)
    assert code == 0, stderr
    summary = last_line(stdout)
    wanted = checkpoint_of(dest)
    assert files_under(target) == wanted  # names and bytes
    assert summary["status"] == "exported" and summary["files"] == len(wanted) - 1
    assert summary["version"] == json.load(open(os.path.join(dest, "_SUCCESS")))["version"]
    # DEST holds more than the checkpoint: its state, and the first version's unit file
    left_out = set(at_dest) - set(wanted)
    assert any(name.startswith(".nvfp4/") for name in left_out)
    assert any(name.startswith("model-layer-") for name in left_out)
    assert files_under(dest) == at_dest  # DEST untouched
    # every file the index names is in TARGET: a loader finds the whole model there
    index = json.load(open(os.path.join(target, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) <= set(os.listdir(target))
    # TARGET is a committed checkpoint itself: it exports again to the same files
    again = str(tmp_path / "again")
    assert run_cli("export", target, again)[0] == 0
    assert files_under(again) == wanted


def test_export_to_s3_and_back(dest, bucket, tmp_path):
    import s3fs

    target = f"s3://{bucket}/published/model"
    code, stdout, stderr = run_cli("export", dest, target)
    assert code == 0, stderr
    keys = s3fs.S3FileSystem(skip_instance_cache=True).find(f"{bucket}/published")
    assert sorted(key.rsplit("/", 1)[1] for key in keys) == sorted(checkpoint_of(dest))
    back = str(tmp_path / "back")
    code, _, stderr = run_cli("export", target, back)
    assert code == 0, stderr
    assert files_under(back) == checkpoint_of(dest)
    # refused on S3 as locally: a non-empty TARGET, a missing bucket
    code, stdout, _ = run_cli("export", dest, target)
    assert code == 2 and "is not empty" in last_line(stdout)["error"]
    code, stdout, _ = run_cli("export", dest, f"s3://{bucket}-missing/model")
    assert code == 2 and "does not exist" in last_line(stdout)["error"]


def assert_refused(argv: list[str], fragment: str) -> None:
    code, stdout, stderr = run_cli(*argv)
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("nvfp4-ray: error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in stderr, stderr
    assert fragment in last_line(stdout)["error"]


def test_export_refuses_bad_input_before_writing(dest, tmp_path):
    unfinished = str(tmp_path / "unfinished")
    shutil.copytree(dest, unfinished)
    os.remove(os.path.join(unfinished, "_SUCCESS"))  # what a run that did not finish leaves
    target = str(tmp_path / "target")
    assert_refused(["export", unfinished, target], "holds no committed checkpoint (no _SUCCESS)")
    assert not os.path.exists(target)
    os.makedirs(target)
    open(os.path.join(target, "notes.txt"), "w").write("mine")
    assert_refused(["export", dest, target], "is not empty (found notes.txt)")
    assert os.listdir(target) == ["notes.txt"]
    assert_refused(["export", dest, os.path.join(dest, "published")], "is DEST or inside it")
    assert_refused(["export", dest, dest], "is DEST or inside it")
    assert not os.path.exists(os.path.join(dest, "published"))


def test_an_export_cut_short_is_recognisable_and_the_same_command_completes_it(dest, tmp_path):
    changed = str(tmp_path / "dest")
    shutil.copytree(dest, changed)
    manifest = json.load(open(os.path.join(changed, "manifest.json")))
    unit = sorted(name for name in manifest["files"] if name.startswith("model-layer-"))[-1]
    path = os.path.join(changed, unit)
    original = open(path, "rb").read()
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF  # same size: only the hash tells
    open(path, "wb").write(damaged)
    target = str(tmp_path / "target")
    code, stdout, stderr = run_cli("export", changed, target)
    assert code == 3 and "is no longer the file its manifest names" in last_line(stdout)["error"], stderr
    assert not os.path.exists(os.path.join(target, "_SUCCESS"))  # recognisably unfinished
    assert unit not in os.listdir(target)  # the file with other bytes never appeared
    open(path, "wb").write(original)
    code, _, stderr = run_cli("export", changed, target)  # the same command completes it
    assert code == 0, stderr
    assert files_under(target) == checkpoint_of(dest)
