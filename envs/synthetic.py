"""Built-in synthetic tasks that a tiny model can learn on a CPU: every problem of the configured space, in a fixed
order (sampling and splitting happen in `envs.sources`, by seed)."""

from __future__ import annotations

import itertools
import operator

from envs.config import ArithmeticConfig, ReverseConfig
from envs.rows import PromptRow

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "max": max, "min": min}
_INFIX = ("+", "-", "*")  # the others are written as functions: "max(3,8)="


def arithmetic_rows(cfg: ArithmeticConfig) -> list[PromptRow]:
    """Every "a<op>b=" (or "<op>(a,b)=" for max and min) with operands in [min_operand, max_operand], e.g. "3+4="
    with ground truth "7", "max(3,8)=" with "8"."""
    operands = range(cfg.min_operand, cfg.max_operand + 1)
    rows = []
    for op, a, b in itertools.product(cfg.ops, operands, operands):
        result = _OPS[op](a, b)
        if (result < 0 and not cfg.allow_negative) or (cfg.max_result is not None and result > cfg.max_result):
            continue
        prompt = f"{a}{op}{b}=" if op in _INFIX else f"{op}({a},{b})="
        rows.append(PromptRow(id=f"arithmetic:{prompt}", prompt=prompt, meta={"ground_truth": str(result)}))
    return rows


def reverse_rows(cfg: ReverseConfig) -> list[PromptRow]:
    """Every digit string with min_length..max_length digits as "rev 123=" with ground truth "321"."""
    rows = []
    for length in range(cfg.min_length, cfg.max_length + 1):
        for digits in itertools.product("0123456789", repeat=length):
            text = "".join(digits)
            prompt = f"rev {text}="
            rows.append(PromptRow(id=f"reverse:{text}", prompt=prompt, meta={"ground_truth": text[::-1]}))
    return rows
