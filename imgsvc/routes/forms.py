"""An operation's options model as form fields: a FastAPI dependency built from the model.

Each field becomes a `Form` parameter of the same name, type, default, description and bounds,
so the form fields, their validation and the OpenAPI docs all come from the one pydantic model
that batch jobs and quotes use too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import annotated_types
from fastapi import Form
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)
_BOUNDS = {
    annotated_types.Ge: "ge",
    annotated_types.Gt: "gt",
    annotated_types.Le: "le",
    annotated_types.Lt: "lt",
    annotated_types.MinLen: "min_length",
    annotated_types.MaxLen: "max_length",
}


def _form(field: FieldInfo) -> Any:
    bounds = {
        _BOUNDS[type(m)]: getattr(m, _BOUNDS[type(m)]) for m in field.metadata if type(m) in _BOUNDS
    }
    return Form(description=field.description, **bounds)


def form_fields(model: type[M]) -> Callable[..., M]:
    """A dependency returning `model` filled from the request's form fields."""

    def dependency(**values: Any) -> M:
        try:
            return model.model_validate(values)
        except ValidationError as exc:  # the same bounds were checked on the form already
            raise RequestValidationError(exc.errors()) from None

    dependency.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=field.default,
                annotation=Annotated[field.annotation, _form(field)],
            )
            for name, field in model.model_fields.items()
        ],
        return_annotation=model,
    )
    dependency.__name__ = f"{model.__name__}_form"
    return dependency
