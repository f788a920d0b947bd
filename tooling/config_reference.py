"""``relayrl config-reference``: every field of a run config as Markdown tables (docs/config.md).

`render` walks the pydantic models of `orchestrator.config.RunConfig` through their ``model_fields``: one
table per section (nested model), in declaration order, each row a field's dotted name, type, default,
bounds (``ge``/``gt``/``le``/``lt``, lengths) and description. A field that is a tagged union of models
(``Field(discriminator="type")``) reads as its tags in the type column and gets one table per variant,
headed by its ``type`` value; an optional
section (``LoraSpec | None``) is a table like any other. The output depends only on the models, so the
committed page is checked against it (`tests/unit/test_config_reference.py`).

Left out on purpose: the validators that relate several fields (each raises a one-line error naming the
fields; they live beside the models) and the presets (`orchestrator.config.PRESETS`).
"""

from __future__ import annotations

import enum
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from orchestrator.config import RunConfig

COMMAND = "relayrl config-reference --out docs/config.md"
"""The command that writes the committed page."""

_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "<="),
           (annotated_types.Lt, "lt", "<"), (annotated_types.MinLen, "min_length", "length >="),
           (annotated_types.MaxLen, "max_length", "length <="), (annotated_types.MultipleOf, "multiple_of",
                                                                  "multiple of"))
_UNION_ORIGINS = (typing.Union, types.UnionType)


@dataclass(frozen=True)
class _Section:
    """One heading: the fields of ``model`` under the dotted prefix ``name`` ("" for the root); ``tag`` is
    'type = "x"' for a variant of a union; ``model`` is None for the heading above a union's variants."""

    name: str
    model: type[BaseModel] | None
    intro: str
    depth: int
    tag: str | None = None
    disc: str | None = None


def render(root: type[BaseModel] = RunConfig) -> str:
    """The reference page of ``root`` (default `RunConfig`) as Markdown; deterministic for given models."""
    lines = [
        "# Config reference",
        "",
        f"Every field of a run config (`{root.__module__}.{root.__qualname__}` and the sections it composes), "
        f"generated from the pydantic models by `{COMMAND}`. Do not edit by hand: "
        "`tests/unit/test_config_reference.py` fails when this page and the models differ.",
        "",
        "A field `a.b.c` is set in a run's TOML file as `c = ...` under `[a.b]`, or on the command line as "
        "`a.b.c=VALUE` (parsed as a TOML value). Bounds: `>=` ge, `>` gt, `<=` le, `<` lt. `None`: unset. "
        "A field typed `type = \"a\" | \"b\"` is one of several tables, chosen by its `type` value; each has "
        "its own table below. "
        "Rules that relate several fields are validators beside the models (each error names the fields); "
        "[guide.md](guide.md) explains how a config is loaded and overridden.",
        "",
    ]
    sections = list(_sections(root, "", "", 0, ()))
    contents = [s.name or "top level" for s in sections if s.tag is None]
    lines += ["Sections: " + ", ".join(f"[{c}](#{_anchor(c)})" for c in contents) + ".", ""]
    for s in sections:
        lines += _table(s)
    return "\n".join(lines).rstrip("\n") + "\n"


def _sections(model: type[BaseModel], name: str, intro: str, depth: int, path: tuple[type[BaseModel], ...],
              tag: str | None = None, path_info: FieldInfo | None = None):
    """Yield the section of ``model`` and, depth first in declaration order, every section below it."""
    if model in path:
        raise ValueError(f"config model {model.__qualname__} contains itself at {name!r}")
    yield _Section(name, model, intro, depth, tag, _discriminator(path_info) if tag else None)
    for field_name, info in model.model_fields.items():
        dotted = f"{name}.{field_name}" if name else field_name
        subs = _submodels(dotted, info)
        if any(t is not None for _, _, t in subs):  # a union of models: a heading, then one table per variant
            yield _Section(dotted, None, info.description or "", depth + 1, disc=_discriminator(info))
        for sub_name, sub_model, sub_tag in subs:
            yield from _sections(sub_model, sub_name, info.description or "", depth + 1 + (sub_tag is not None),
                                 (*path, model), sub_tag, info)


def _submodels(dotted: str, info: FieldInfo) -> list[tuple[str, type[BaseModel], str | None]]:
    """The sections a field holds: ``(name, model, None)`` for a nested (or optional) model,
    ``(name, variant, 'type = "x"')`` for each variant of a union of models; a model (or union) inside dict
    values is named ``name.<name>``, inside list items ``name[]``."""
    tp = _unwrap(info.annotation)
    models = _models(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if not models and origin is dict and len(args) == 2:
        dotted, models = f"{dotted}.<name>", _models(args[1])
    elif not models and origin in (list, tuple, set, frozenset) and args:
        dotted, models = f"{dotted}[]", _models(args[0])
    if len(models) == 1:
        return [(dotted, models[0], None)]
    disc = _discriminator(info)
    return [(dotted, m, f"{disc} = {_tag(m, disc)}") for m in models]


def _discriminator(info: FieldInfo | None) -> str:
    """The field that tells a union's variants apart: the ``discriminator`` named on the field, else ``type``."""
    disc = info.discriminator if info is not None else None
    return disc if isinstance(disc, str) else "type"


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and type aliases (``type X = ...``)."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif hasattr(tp, "__value__") and not isinstance(tp, type):
            tp = tp.__value__
        else:
            return tp


def _models(tp: Any) -> list[type[BaseModel]]:
    """The model classes a type is, or is a union of (``None`` and other members left out)."""
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    if typing.get_origin(tp) in _UNION_ORIGINS:
        return [m for a in typing.get_args(tp) for m in _models(a)]
    return []


def _tag(model: type[BaseModel], disc: str) -> str:
    """The discriminator value(s) that select ``model``, e.g. ``"ppo_tis"``."""
    field = model.model_fields.get(disc)
    if field is None:
        return model.__name__
    tp = _unwrap(field.annotation)
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(_value(v) for v in typing.get_args(tp))
    return _value(field.default) if field.default is not None else model.__name__


def _table(s: _Section) -> list[str]:
    heading = f"{s.name}, {s.tag}" if s.tag else (s.name or "top level")
    lines = ["#" * min(1 + max(s.depth, 1), 6) + " " + heading.replace("<", "&lt;"), ""]  # top level, sections: ##
    if s.model is None:  # the heading above a union's variants
        intro = _one_line(s.intro).rstrip(".")
        return [*lines, (f"{intro}. " if intro else "") + f"One of the variants below, chosen by `{s.disc}`.", ""]
    where = f"`{s.model.__module__}.{s.model.__qualname__}`"
    doc = (s.model.__dict__.get("__doc__") or "").strip().split("\n\n")[0]  # its own, never a base class's
    text = s.intro if s.intro and not s.tag else doc
    lines += [(_one_line(text) + " " if text else "") + f"({where})", ""]
    lines += ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
    for field_name, info in s.model.model_fields.items():
        dotted = f"{s.name}.{field_name}" if s.name else field_name
        default = _default(info)
        description = info.description or ("selects this variant" if field_name == s.disc else "")
        cells = (_code(dotted), _code(_field_type(info)),
                 "(table below)" if default is None else _code(default), _code(_bounds(info)),
                 _text(description))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _field_type(info: FieldInfo) -> str:
    """A field's type; a union of sections reads as its tags (``type = "a" | "b"``), other members after them."""
    models = _models(info.annotation)
    if len(models) < 2:
        return _type_name(info.annotation)
    disc = _discriminator(info)
    tp = _unwrap(info.annotation)
    members = typing.get_args(tp) if typing.get_origin(tp) in _UNION_ORIGINS else ()
    others = [_type_name(a) for a in members if not _models(a)]
    return " | ".join([f"{disc} = " + " | ".join(_tag(m, disc) for m in models), *others])


def _type_name(tp: Any) -> str:
    tp = _unwrap(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None) or tp is None:
        return "None"
    if origin is typing.Literal:
        return " | ".join(_value(a) for a in args)
    if origin in _UNION_ORIGINS:
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]" if args else name
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _default(info: FieldInfo) -> str | None:
    """The default as TOML writes it, ``required``, or None for a section (its own table follows)."""
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True, validated_data={})
    if isinstance(value, BaseModel):
        disc = _discriminator(info)
        if len(_models(info.annotation)) > 1 and disc in type(value).model_fields:
            return f"{{{disc} = {_value(getattr(value, disc))}}}"
        return None
    return _value(value)


def _value(v: Any) -> str:
    """A default or literal as it is written in TOML (``None`` for unset)."""
    if isinstance(v, enum.Enum):
        v = v.value
    if v is None:
        return "None"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
        return "[" + ", ".join(_value(x) for x in items) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, BaseModel):
        return "{" + ", ".join(f"{k} = {_value(x)}" for k, x in v.model_dump().items()) + "}"
    return str(v)


def _bounds(info: FieldInfo) -> str:
    out = []
    for meta in info.metadata:
        for cls, attr, sign in _BOUNDS:
            if isinstance(meta, cls):
                out.append(f"{sign} {_value(getattr(meta, attr))}")
        if isinstance(meta, annotated_types.Interval):  # ge/gt/le/lt given together as one constraint
            out += [f"{sign} {_value(getattr(meta, attr))}" for _, attr, sign in _BOUNDS[:4]
                    if getattr(meta, attr, None) is not None]
    return ", ".join(out)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _text(text: str) -> str:
    """A table cell of prose: one line, ``|`` escaped, ``<`` too (``<number>`` is no HTML tag)."""
    return _one_line(text).replace("|", "\\|").replace("<", "&lt;")


def _code(text: str) -> str:
    """A table cell in code font (``|`` still escaped: GFM splits cells before it reads code spans)."""
    if not text:
        return ""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    body = _one_line(text).replace("|", "\\|")
    return f"{fence}{pad}{body}{pad}{fence}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
