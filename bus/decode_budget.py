"""What decoding one message may build: Python objects of at most `MAX_AMPLIFICATION` times its wire size.

msgpack's length limits bound each string, bin, array and map, not what the whole message becomes: one byte on the
wire can be a Python object of 50-70 bytes (an empty array is a list: 56 bytes and a pointer; an empty map a dict;
a 2-character string 51 bytes), so 16 MB of nested empty arrays decoded to ~1 GB. msgpack calls `list_hook` and
`object_hook` as each array and map is complete (innermost first), so `hooks(size)` estimates the bytes of every
container and of its scalar elements as they are built and refuses the message (`OverBudget`, on `data`) once the
estimate passes the budget: what was built is freed, and the rest is never built.

The estimate, per container: its own size (a list 56 + 8 per element; a dict 64 + 100 per entry, its key string
included) plus its scalar elements, each costing the largest of the kinds present (a float 24, a str 50, a bin 33,
an int 28 unless all are CPython's cached small ints; containers count in their own hook). String and bin contents
are not counted: they are no larger than on the wire. Measured (tests/unit/bus/test_decode_budget.py): valid groups
estimate 0.1-7.4x their size (bin arrays ~0.1x, 1024 three-token members 7.4x, plain msgpack arrays 4.9x).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bus.schema import MessageError

MAX_AMPLIFICATION = 16  # estimated object bytes per wire byte beyond which a message is refused
_SCALAR_BYTES: dict[type, int] = {float: 24, str: 50, bytes: 33, int: 28, bool: 0, type(None): 0, list: 0, dict: 0}
_LIST_BYTES, _LIST_SLOT, _DICT_BYTES, _DICT_ENTRY = 56, 8, 64, 100


class OverBudget(MessageError):
    """The message decodes to more objects than its budget: a property of the whole message (field `data`)."""


def _elements(values: Any, count: int) -> int:
    """Estimated bytes of the scalar objects among `values` (`count` of them)."""
    kinds = set(map(type, values))
    if kinds == {int} and min(values) >= -5 and max(values) <= 256:
        return 0  # cached by CPython: no object per element
    return count * max(_SCALAR_BYTES.get(kind, _DICT_ENTRY) for kind in kinds)


def hooks(size: int) -> tuple[Callable[[list[Any]], list[Any]], Callable[[dict[str, Any]], dict[str, Any]]]:
    """msgpack's (list_hook, object_hook) for decoding a message of `size` wire bytes within the budget."""
    budget = MAX_AMPLIFICATION * size
    spent = 0

    def charge(amount: int) -> None:
        nonlocal spent
        spent += amount
        if spent > budget:
            raise OverBudget(
                "data",
                f"decodes to over {MAX_AMPLIFICATION}x its {size} bytes in objects (nested containers, short "
                "strings, arrays of numbers): refused unbuilt; send token and logprob arrays as bin",
            )

    def list_hook(values: list[Any]) -> list[Any]:
        count = len(values)
        charge(_LIST_BYTES + _LIST_SLOT * count + (_elements(values, count) if count else 0))
        return values

    def object_hook(entries: dict[str, Any]) -> dict[str, Any]:
        count = len(entries)
        charge(_DICT_BYTES + _DICT_ENTRY * count + (_elements(entries.values(), count) if count else 0))
        return entries

    return list_hook, object_hook
