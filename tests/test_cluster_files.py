"""The files users apply as they are: jobs/configs, jobs/recipes and cluster/.

Each is checked against what reads it where that reader is installed here: job configs go
through QuantizeConfig (as ``jobs/quantize.py --config`` does), recipes through
llm-compressor's parser, the cluster-launcher YAML through Ray's own validator (as ``ray
up`` does), the runtime env through Ray's RuntimeEnv. KubeRay, Kubernetes and Argo are
not installed here, so their manifests get a structural check of what docs/cluster.md
promises. The Dockerfile cannot be built here; its pins are checked against pyproject.toml.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
RECIPES = sorted((ROOT / "jobs" / "recipes").glob("*.yaml"))
YAML_FILES = sorted(CLUSTER.rglob("*.yaml")) + JOB_CONFIGS + RECIPES
IMAGE = "registry.example.com/nvfp4-ray:0.1.0"


def load(relative: str) -> dict:
    return yaml.safe_load((ROOT / relative).read_text())


def pyproject_requirements() -> list:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def pyproject_pins() -> dict[str, str]:
    """name -> version of every ``==`` dependency in pyproject.toml (extras dropped)."""
    return {r.name: s.version for r in pyproject_requirements() for s in r.specifier if s.operator == "=="}


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def config_argument(words: list[str]) -> str:
    return words[words.index("--config") + 1]


# ---- every file ------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses_to_mappings(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(d, dict) for d in documents)


CREDENTIAL_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"(?i)secret_access_key\W{1,3}[A-Za-z0-9/+=]{40}\b"),  # a secret key as a value
    re.compile(r"(?i)session_token\W{1,3}[A-Za-z0-9/+=]{100,}"),
]


def env_entries(node):
    """Every Kubernetes ``env`` entry anywhere in a manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_entries(item)


def test_no_inline_credentials_anywhere():
    files = [p for p in sorted(CLUSTER.rglob("*")) + sorted((ROOT / "jobs").rglob("*")) if p.is_file()]
    for path in files:
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            assert not pattern.search(text), f"{path.relative_to(ROOT)} holds what looks like a credential"
    for path in CLUSTER.rglob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            for entry in env_entries(document):
                if re.search(r"AWS|SECRET|TOKEN|PASSWORD|KEY", entry["name"]):
                    assert "value" not in entry, f"{path.name}: {entry['name']} must come from a Secret"
    assert "env_vars" not in load("cluster/runtime_env.yaml")  # runtime envs show in the dashboard


def test_detector_catches_a_credential():
    leaked = "AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\nkey: AKIAIOSFODNN7EXAMPLE"
    assert sum(bool(p.search(leaked)) for p in CREDENTIAL_PATTERNS) == 2


# ---- jobs/configs and jobs/recipes -----------------------------------------------------


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_validates(path):
    from nvfp4_ray.config import QuantizeConfig

    config = QuantizeConfig.build({}, str(path))
    if config.recipe is not None:
        assert (ROOT / config.recipe).is_file(), "recipe paths resolve from the job's working dir, the repo root"


def test_config_validation_is_strict(tmp_path):
    from nvfp4_ray.config import QuantizeConfig
    from nvfp4_ray.errors import InputError

    typo = tmp_path / "typo.yaml"
    typo.write_text((ROOT / "jobs/configs/mistral-medium-3.5-128b-nvfp4.yaml").read_text() + "num_sample: 64\n")
    with pytest.raises(InputError, match="num_sample: unknown option"):
        QuantizeConfig.build({}, str(typo))


def test_mistral_medium_config_is_the_issue_recipe():
    config = load("jobs/configs/mistral-medium-3.5-128b-nvfp4.yaml")
    assert (config["num_samples"], config["max_seq_len"], config["scheme"]) == (256, 1024, "NVFP4")
    assert config["ignore"] == ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
    assert all(config[key].startswith("s3://") for key in ("source", "dest", "calibration"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_with_llm_compressor(path):
    from nvfp4_ray.recipe import load_recipe

    recipe = load_recipe(str(path), "NVFP4", [])
    assert recipe.config_groups and "lm_head" in recipe.ignore


# ---- cluster/aws: Ray's cluster-launcher validator -------------------------------------


def ray_up_validate(config: dict) -> None:
    """What `ray up` does before touching AWS: fill in the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_aws_cluster_passes_rays_validator():
    ray_up_validate(load("cluster/aws/cluster.yaml"))


def _typo(c):
    c["max_worker"] = c.pop("max_workers")


def _no_node_config(c):
    del c["available_node_types"]["b200"]["node_config"]


def _unknown_head(c):
    c["head_node_type"] = "ray.head.default"


def _too_many_min_workers(c):
    c["available_node_types"]["b200"]["min_workers"] = c["max_workers"] + 1


def _unknown_docker_option(c):
    c["docker"]["gpus"] = "all"


BREAKAGES = [_typo, _no_node_config, _unknown_head, _too_many_min_workers, _unknown_docker_option]


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_rays_validator_rejects_a_broken_copy(breakage):
    import jsonschema

    config = load("cluster/aws/cluster.yaml")
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_validate(config)


def test_aws_cluster_runs_the_image_on_b200_workers():
    config = load("cluster/aws/cluster.yaml")
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert [w["node_config"]["InstanceType"] for w in workers] == ["p6-b200.48xlarge"]
    assert workers[0]["resources"]["GPU"] == 8 and 0 <= workers[0]["min_workers"] <= workers[0]["max_workers"]
    assert config["docker"]["image"] == IMAGE
    # Ray's defaults would pip-install a Ray wheel over the image's pinned one.
    assert config["setup_commands"] == config["head_setup_commands"] == config["worker_setup_commands"] == []


# ---- cluster/kuberay --------------------------------------------------------------------


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == pyproject_pins()["ray"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for container in containers(head["template"]["spec"]):
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
    gpu_groups = [
        group
        for group in spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(group["template"]["spec"]))
    ]
    assert gpu_groups, "a worker group must request GPUs"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        assert pod["nodeSelector"] and pod["tolerations"]
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in containers(pod):
            assert container["image"] == IMAGE
            assert {"secretRef": {"name": "nvfp4-ray-s3"}} in container["envFrom"], "S3 credentials from the Secret"


def test_raycluster_manifest():
    cluster = load("cluster/kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    check_ray_cluster_spec(cluster["spec"])


def test_rayjob_manifest():
    job = load("cluster/kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
    command = spec["entrypoint"].split("&&")[-1]
    assert shlex.split(command)[:2] == ["python", "jobs/quantize.py"]
    assert (ROOT / config_argument(shlex.split(command))).is_file()
    check_ray_cluster_spec(spec["rayClusterSpec"])
    assert spec["rayClusterSpec"] == load("cluster/kuberay/raycluster.yaml")["spec"], "keep the two clusters equal"


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**load("cluster/runtime_env.yaml"))


# ---- cluster/schedule and cluster/pipeline ----------------------------------------------


def head_service() -> str:
    return load("cluster/kuberay/raycluster.yaml")["metadata"]["name"] + "-head-svc"


def test_cronjob_runs_daily_against_the_raycluster():
    cron = load("cluster/schedule/cronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    minute, hour, *rest = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and rest == ["*", "*", "*"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    command = container["command"]
    assert command[:2] == ["python", "cluster/submit_job.py"] and "--if-changed" in command
    assert f"http://{head_service()}:8265" in command
    assert (ROOT / config_argument(command)).is_file()
    fail_fast = [rule for rule in job["podFailurePolicy"]["rules"] if rule["action"] == "FailJob"]
    assert fail_fast[0]["onExitCodes"] == {"containerName": container["name"], "operator": "In", "values": [2]}
    assert job["backoffLimit"] >= 1, "exit 3 is retried"


def test_argo_stage_exposes_exit_code_and_summary_and_branches():
    workflow = load("cluster/pipeline/argo-workflow.yaml")
    assert (workflow["apiVersion"], workflow["kind"]) == ("argoproj.io/v1alpha1", "Workflow")
    templates = {t["name"]: t for t in workflow["spec"]["templates"]}
    quantize = templates["quantize"]
    args = quantize["container"]["args"]
    assert quantize["container"]["command"] == ["python", "cluster/submit_job.py"] and "--if-changed" in args
    outputs_dir = args[args.index("--outputs") + 1]
    paths = {p["name"]: p["valueFrom"]["path"] for p in quantize["outputs"]["parameters"]}
    assert paths == {
        "exit-code": f"{outputs_dir}/exit_code",
        "status": f"{outputs_dir}/status",
        "summary": f"{outputs_dir}/summary.json",
    }
    retry = quantize["retryStrategy"]
    assert retry["expression"] == "asInt(lastRetry.exitCode) == 3", "retry exit 3 only; exit 2 fails at once"
    pipeline = templates[workflow["spec"]["entrypoint"]]
    conditions = [step.get("when", "") for group in pipeline["steps"] for step in group]
    assert "{{steps.quantize.outputs.parameters.status}} == succeeded" in conditions
    assert "{{steps.quantize.outputs.parameters.status}} == unchanged" in conditions
    parameters = {p["name"]: p["value"] for p in workflow["spec"]["arguments"]["parameters"]}
    assert (ROOT / parameters["config"]).is_file()
    assert parameters["ray-address"] == f"http://{head_service()}:8265"


# ---- cluster/docker ---------------------------------------------------------------------


def dockerfile_pins() -> dict[str, str]:
    from packaging.requirements import Requirement

    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    pins = {}
    for token in re.findall(r"""["']?([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?==[^\s"'\\]+)""", text):
        requirement = Requirement(token)
        pins[requirement.name] = next(iter(requirement.specifier)).version
    return pins


def test_dockerfile_pins_agree_with_pyproject_and_the_tested_torch():
    pins = dockerfile_pins()
    for name, version in pyproject_pins().items():
        assert pins.get(name) == version, f"{name}: Dockerfile {pins.get(name)} != pyproject.toml {version}"
    tested_torch = re.search(r"torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert pins["torch"] == tested_torch
    [torch] = [r for r in pyproject_requirements() if r.name == "torch"]
    assert torch.specifier.contains(pins["torch"])


def test_dockerfile_base_has_cuda_for_blackwell_and_tags_the_manifests_image():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    major, minor = map(int, re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.", text, re.MULTILINE).groups())
    assert (major, minor) >= (12, 8)
    assert f"-t {IMAGE} ." in text


def test_cluster_docs_name_existing_files():
    section = (ROOT / "docs" / "cluster.md").read_text()
    paths = set(re.findall(r"\b(?:cluster|jobs)/[\w./-]+\.(?:yaml|py)\b|cluster/docker/Dockerfile\b", section))
    assert "jobs/configs/mistral-medium-3.5-128b-nvfp4.yaml" in paths
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing


def test_nvidia_recipe_picks_fp8_and_nvfp4_layers_as_documented():
    """Over the 88 layers the recipe assumes: attention and the MLPs of layers 0-3 and 87 in
    FP8, every other MLP in NVFP4, no Linear in both, and an FP8 KV cache."""
    import re

    from nvfp4_ray.recipe import load_recipe

    recipe = load_recipe(str(ROOT / "jobs/recipes/mistral-medium-3.5-nvidia-fp8-nvfp4.yaml"), "NVFP4", [])
    schemes = {g.weights.num_bits: [t.removeprefix("re:") for t in g.targets] for g in recipe.config_groups.values()}
    assert sorted(schemes) == [4, 8]
    assert recipe.quantization_config.kv_cache_scheme.observer == "static_minmax"

    def picked(name: str) -> list[int]:
        return [bits for bits, patterns in schemes.items() if any(re.match(p, name) for p in patterns)]

    for layer in range(88):
        prefix = f"model.language_model.layers.{layer}"
        for proj in ("q", "k", "v", "o"):
            assert picked(f"{prefix}.self_attn.{proj}_proj") == [8]
        expected = [8] if layer in (0, 1, 2, 3, 87) else [4]
        for proj in ("gate", "up", "down"):
            assert picked(f"{prefix}.mlp.{proj}_proj") == expected, (layer, proj)
