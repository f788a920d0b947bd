"""`StrictConfig`: the base every relayrl config section derives from.

`tagged_union` builds a config field that holds one of several variants (a loss, an advantage estimator,
a weight transport), chosen by its ``type``. It lives in the lowest package because every package has a config section; each package's own
config sits beside it (`buffer.config`, `rollout.config`, `learner.config`, `orchestrator.config`) and
`orchestrator.config.RunConfig` composes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class StrictConfig(BaseModel):
    """Base of every relayrl config section: unknown fields are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def tagged_union(name: str, variants: Sequence[type[StrictConfig]], default: type[StrictConfig]) -> Any:
    """The type of a config field holding one of ``variants``, chosen by their ``type`` tag (a pydantic
    discriminated union, as prime-rl's ``LossConfig``).

    ``name = "x"`` means variant ``x`` with its defaults; a table without ``type`` means the ``default``
    variant (so ``learner.loss.clip_high=0.3`` alone tweaks the default loss).

    Args:
        name: the field's dotted name, for error messages (``learner.loss``).
        variants: the config classes, each with a ``type: Literal["..."]`` field.
        default: the variant of a table that names none.

    Raises:
        ValueError (as a validation error): a name no variant has.
    """
    tags = sorted(v.model_fields["type"].default for v in variants)
    default_type = default.model_fields["type"].default

    def tagged(value: Any) -> Any:
        if isinstance(value, str):
            if value not in tags:
                raise ValueError(f"{name} = {value!r} is not registered; use one of {tags}")
            return {"type": value}
        if isinstance(value, dict) and "type" not in value:
            return {"type": default_type, **value}
        return value

    return Annotated[Union[tuple(variants)], Field(discriminator="type"), BeforeValidator(tagged)]  # noqa: UP007
