"""JSON value types shared by every layer: what json.load returns and json.dump accepts."""

from __future__ import annotations

from typing import Union

# A recursive alias: mypy checks every level of a JSON document typed with it.
JSONValue = Union[str, int, float, bool, None, list["JSONValue"], dict[str, "JSONValue"]]
JSONObject = dict[str, JSONValue]
