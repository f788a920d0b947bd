"""The cluster manifests start what their example configs ask for, with the image the Dockerfile builds.

`deploy/cluster.yaml` (Ray cluster launcher) and `deploy/rayjob.yaml` (KubeRay) are parsed; each example
config a manifest names is loaded (the RayJob's with its entrypoint's overrides), and its actors' bundles
(`orchestrator.placement.run_bundles`, what the run reserves) must fit the nodes the manifest can have: the
head plus every worker group at its largest (max workers / max replicas where autoscaling is on). Where the
manifest starts smaller, the config must wait for the autoscaler (``ray.wait_for_resources_s``).
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from orchestrator.config import RunConfig, load_config
from orchestrator.placement import run_bundles, shortfall

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLE = re.compile(r"deploy/examples/[\w.-]+\.toml")


def cluster_yaml_nodes() -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """(nodes at the cluster's largest, nodes it starts with) of deploy/cluster.yaml."""
    spec = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    types, head = spec["available_node_types"], spec["head_node_type"]
    largest, first, budget = [types[head]["resources"]], [types[head]["resources"]], spec["max_workers"]
    for name, t in types.items():
        if name != head:
            n = min(t.get("max_workers", budget), budget)
            budget -= n
            largest += [t["resources"]] * n
            first += [t["resources"]] * t.get("min_workers", 0)
    return largest, first


def _pod(group: dict) -> dict[str, float]:
    """Ray resources of one KubeRay pod: rayStartParams win over the container limits."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams") or {}
    return {"CPU": float(params.get("num-cpus", limits.get("cpu", 0))),
            "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}


def rayjob_nodes() -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """(pods at the cluster's largest, pods it starts with) of deploy/rayjob.yaml."""
    cluster = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    largest, first = [_pod(cluster["headGroupSpec"])], [_pod(cluster["headGroupSpec"])]
    for g in cluster["workerGroupSpecs"]:
        largest += [_pod(g)] * (g["maxReplicas"] if autoscaling else g["replicas"])
        first += [_pod(g)] * g["replicas"]
    return largest, first


def documented_configs(manifest: str) -> list[RunConfig]:
    """The example configs a manifest names; the RayJob's with its entrypoint's overrides."""
    text = (DEPLOY / manifest).read_text()
    if manifest == "rayjob.yaml":
        words = shlex.split(yaml.safe_load(text)["spec"]["entrypoint"])
        assert words[:2] == ["relayrl", "train"], words
        return [load_config(ROOT / words[2], [w for w in words[3:] if not w.startswith("-")])]
    return [load_config(ROOT / p) for p in sorted(set(EXAMPLE.findall(text)))]


def fits(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """First-fit decreasing: can every bundle go on some node without exceeding any node's resources?"""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0)), reverse=True):
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in b.items())), None)
        if node is None:
            return False
        for k, v in b.items():
            node[k] -= v
    return True


def _totals(nodes: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}


@pytest.mark.parametrize("manifest, nodes", [("cluster.yaml", cluster_yaml_nodes), ("rayjob.yaml", rayjob_nodes)])
def test_manifest_holds_the_example_it_is_documented_with(manifest, nodes):
    largest, first = nodes()
    configs = documented_configs(manifest)
    assert configs and any(c.name == "gsm-symbolic-gpu" for c in configs), "the GPU example is documented here"
    for cfg in configs:
        assert shortfall(cfg, _totals(largest)) == [], f"{manifest} at its largest: {_totals(largest)}"
        assert fits(run_bundles(cfg), largest), f"{manifest}: {run_bundles(cfg)} do not fit on {largest}"
        if not fits(run_bundles(cfg), first):  # the autoscaler must add nodes: the run has to wait for them
            assert cfg.ray.wait_for_resources_s >= 300, f"{manifest} starts with {first}: wait for the autoscaler"


def test_fit_check_catches_a_bundle_that_no_node_holds():
    assert fits([{"CPU": 4.0, "GPU": 1.0}] * 2, [{"CPU": 8.0}, {"CPU": 4.0, "GPU": 1.0}] * 2)
    assert not fits([{"CPU": 4.0, "GPU": 1.0}] * 2, [{"CPU": 8.0, "GPU": 0.0}, {"CPU": 2.0, "GPU": 1.0}] * 2)


def test_rayjob_names_the_image_the_dockerfile_builds():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (image,) = re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", dockerfile)
    assert image.split("/")[-1] == f"relayrl:{project['version']}-gpu"  # <registry>/relayrl:<version>-gpu
    cluster = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {image}
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray[")).split("==")[1]
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert cluster["rayVersion"] == ray_pin and base.startswith(f"rayproject/ray:{ray_pin}-py311")
    assert re.search(r'pip install [^\n]*"\.\[gpu\]"', dockerfile)  # the CUDA vllm extra


def test_the_image_holds_every_package_the_project_installs():
    """A package added to pyproject's package list (base/, tooling/, ...) is copied into the image too."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = set(re.findall(r"^COPY --chown=\S+ (\w+)/ \1/$", dockerfile, re.M))
    assert packages <= copied, f"deploy/Dockerfile does not copy {sorted(packages - copied)}"


def test_manifests_keep_token_auth_on_and_the_dashboard_inside_the_cluster():
    launcher = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    commands = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts)
    assert "auth_token" in str(launcher["file_mounts"])  # the token reaches every node
    assert not any("dashboard-host" in c for c in starts)  # dashboard on the head's loopback
    cluster = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for manifest in ("cluster.yaml", "rayjob.yaml", "runtime_env.yaml"):
        assert not re.search(r"RAY_AUTH_MODE\W+disabled", (DEPLOY / manifest).read_text()), manifest
