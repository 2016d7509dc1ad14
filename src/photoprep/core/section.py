"""The base of every params section: unknown keys refused, values frozen, no ``true`` for a number."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

__all__ = ["Section"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v: Any, info: ValidationInfo) -> Any:
        """YAML's ``true`` is an int to pydantic; a number field must not take it (``concurrency: true``)."""
        if isinstance(v, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            allowed = {annotation, *get_args(annotation)}
            if bool not in allowed and ({int, float} & allowed):
                raise ValueError(f"must be a number, not {str(v).lower()}")
        return v
