"""Option values converted without pydantic where the answer is plain: typer (>= 0.27) builds a
pydantic TypeAdapter for every option of the command that runs, given or not, which costs a
one-token `generate --server` more than its HTTP round trip. Here a value that is already what the
option wants (None, a str for a str option, an enum member, a default int), or a plain decimal
string for a number, is converted directly, to exactly what typer's adapter gives; anything else
(a bad value, bounds not met, paths, files, tuples) goes to typer's own conversion, so its results
and error messages are unchanged. tests/test_cli_lazy.py holds the two to the same answers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Optional, Union

try:  # typer's runtime coercion (0.27 and later); on another typer nothing is changed
    from typer._coercion import RuntimeParam, TypeDescriptor, build_runtime_param
    from typer._param_types import coerce_cli_choice
    from typer.core import _TyperParameter
except ImportError:  # pragma: no cover - an older or newer typer: its own conversion throughout
    _TyperParameter = None  # type: ignore[assignment,misc]  # the patch below is skipped

if TYPE_CHECKING:
    from typer._click.core import Context

_INT = re.compile(r"-?(0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?(0|[1-9][0-9]{0,14})(\.[0-9]{1,15})?")
_MISS = object()  # no plain answer: typer converts the value


def plain(descriptor: TypeDescriptor, value: object, ctx: Optional[Context] = None) -> object:
    """value converted as typer's adapter for the option would convert it, or _MISS where that takes
    more than a type check (then typer does it)."""
    annotation, info = descriptor.annotation, descriptor.parameter_info
    if info.parser is not None or descriptor.file_annotation is not None:
        return _MISS
    if isinstance(value, (list, tuple)) and getattr(annotation, "__origin__", None) is list:
        items = [plain(TypeDescriptor(annotation.__args__[0], info, None), item, ctx) for item in value]
        return _MISS if any(item is _MISS for item in items) else items
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        try:
            return coerce_cli_choice(value, choices=list(annotation), case_sensitive=info.case_sensitive, ctx=ctx)
        except ValueError:
            return _MISS  # typer words the error
    if annotation is str:
        return value if isinstance(value, str) else _MISS
    number: Union[int, float, object] = _MISS
    if annotation is int:
        if type(value) is int:
            number = value
        elif isinstance(value, str) and _INT.fullmatch(value):
            number = int(value)
    elif annotation is float:
        if type(value) is float:
            number = value
        elif isinstance(value, str) and _FLOAT.fullmatch(value):
            number = float(value)
    if not isinstance(number, (int, float)) or info.clamp:
        return _MISS
    inside = (info.min is None or number >= info.min) and (info.max is None or number <= info.max)
    return number if inside else _MISS


if _TyperParameter is not None:

    @dataclass(frozen=True)
    class QuickParam(RuntimeParam):
        """typer's RuntimeParam (None and multi-value handling are its own) with plain() tried first;
        typer's adapter is built only for a value plain() leaves to it."""

        descriptor: Optional[TypeDescriptor] = None

        def _coerce_value(self, value: object, param: _TyperParameter, ctx: Context) -> object:
            assert self.descriptor is not None  # set by _runtime_param
            done = plain(self.descriptor, value, ctx)
            if done is not _MISS:
                return done
            param._runtime_param = build_runtime_param(self.descriptor)  # typer's own from here on
            return param._runtime_param._coerce_value(value, param=param, ctx=ctx)

    def _runtime_param(self: _TyperParameter) -> RuntimeParam:
        if self._runtime_param is None:
            d = self.type_descriptor
            self._runtime_param = QuickParam(d.parameter_info, d.annotation, d)
        return self._runtime_param

    _TyperParameter.get_runtime_param = _runtime_param  # type: ignore[method-assign]
