"""docs/config.md is the render of the config models, every field is on it, and every field has a description."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field, create_model

from base.config import StrictConfig
from buffer.config import BufferConfig
from orchestrator.cli import main
from orchestrator.config import RunConfig
from tooling.config_reference import render

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "config.md"
STALE = "docs/config.md is stale: run `relayrl config-reference --out docs/config.md`"


def _models(tp: Any) -> list[type[BaseModel]]:
    """The model classes in a field's type: itself, union members, dict values, list items."""
    if typing.get_origin(tp) is Annotated:
        return _models(typing.get_args(tp)[0])
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models(a)]


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, Any, bool]]:
    """``(dotted name, field name, FieldInfo, is a section)`` of every field under ``model``, union variants
    included (each variant's fields under the union field's name)."""
    out = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        subs = _models(info.annotation)
        out.append((dotted, name, info, bool(subs)))
        tp = info.annotation
        origin = typing.get_origin(tp)  # the page names list items ``name[]`` and dict values ``name.<name>``
        section = f"{dotted}[]" if origin is list else f"{dotted}.<name>" if origin is dict else dotted
        for sub in subs:
            out += _fields(sub, section + ".")
    return out


def test_committed_page_is_the_render():
    if PAGE.read_text() != render():
        pytest.fail(STALE, pytrace=False)


def test_every_leaf_field_is_on_the_page():
    page = render()
    leaves = [dotted for dotted, _, _, section in _fields(RunConfig) if not section]
    assert len(leaves) > 100  # the walk reached every section, not just the top level
    missing = [d for d in leaves if f"`{d}`" not in page]
    assert not missing, f"fields missing from the config reference: {missing}"


def test_every_field_has_a_description():
    """Rule 2 of STYLE.md: every field has a one-line description (a union variant's tag may go without)."""
    def is_tag(name, info):  # ``type: Literal["x"]``: names its variant, nothing to describe
        tp = info.annotation
        return name == "type" and typing.get_origin(tp) is Literal and len(typing.get_args(tp)) == 1

    missing = [dotted for dotted, name, info, _ in _fields(RunConfig)
               if not (info.description or "").strip() and not is_tag(name, info)]
    assert not missing, f"config fields without a description: {missing}"


def test_a_new_field_or_default_shows_up():
    """The staleness check can fail: a made-up field, and a changed default, change the render."""
    base = render()
    extra = create_model("RunConfigPlus", __base__=RunConfig,
                         made_up_knob=(int, Field(7, ge=1, le=9, description="a knob no run has")))
    plus = render(extra)
    assert plus != base
    assert "| `made_up_knob` | `int` | `7` | `>= 1, <= 9` | a knob no run has |" in plus

    buffer = create_model("BufferLag3", __base__=BufferConfig,
                          max_staleness=(int, Field(3, ge=0, le=1000, description="max policy lag")))
    lagged = create_model("RunConfigLag3", __base__=RunConfig,
                          buffer=(buffer, Field(default_factory=buffer, description="the data manager")))
    page = render(lagged)
    assert page != base and "| `buffer.max_staleness` | `int` | `3` |" in page


class _Inner(StrictConfig):
    k: int = Field(3, ge=1, lt=10, description="an inner knob")


class _Clip(StrictConfig):
    """Clipped loss."""

    type: Literal["clip"] = "clip"
    clip_low: float = Field(0.2, ge=0.0, le=1.0, description="clip below 1")
    inner: _Inner = Field(default_factory=_Inner, description="a section inside a variant")


class _Seq(StrictConfig):
    type: Literal["seq"] = "seq"
    clip_low: float = Field(3e-4, ge=0.0, description="sequence clip")


class _Shapes(StrictConfig):
    loss: Annotated[_Clip | _Seq, Field(discriminator="type")] = Field(
        default_factory=_Clip, description="tagged union")
    lora: _Inner | None = Field(None, description="optional section")
    named: dict[str, _Inner] = Field(default_factory=dict, description="sections by name")
    free: dict[str, Any] = Field(default_factory=lambda: {"a": 1}, description="free table")
    mode: Literal["x", "y"] = Field("x", description="a literal")
    cap: float | None = Field(None, gt=0, description="optional number")
    required: int = Field(description="no default", gt=0)


def test_renders_unions_optionals_dicts_and_literals():
    page = render(_Shapes)
    assert "| `loss` | `type = \"clip\" \\| \"seq\"` | `{type = \"clip\"}` |" in page
    assert "### loss, type = \"clip\"" in page and "### loss, type = \"seq\"" in page
    assert "| `loss.clip_low` | `float` | `0.2` | `>= 0.0, <= 1.0` | clip below 1 |" in page
    assert "| `loss.clip_low` | `float` | `0.0003` | `>= 0.0` | sequence clip |" in page
    assert "| `loss.inner.k` | `int` | `3` | `>= 1, < 10` | an inner knob |" in page
    assert "| `lora` | `_Inner \\| None` | `None` |" in page and "| `lora.k` |" in page
    assert "| `named.<name>.k` |" in page
    assert "| `free` | `dict[str, Any]` | `{a = 1}` |" in page
    assert "| `mode` | `\"x\" \\| \"y\"` | `\"x\"` |" in page
    assert "| `cap` | `float \\| None` | `None` | `> 0` |" in page
    assert "| `required` | `int` | `required` | `> 0` | no default |" in page
    assert render(_Shapes) == page  # deterministic


def test_cli_writes_the_page(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert main(["config-reference", "--out", str(out)]) == 0
    assert out.read_text() == render()
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out.endswith(render())
