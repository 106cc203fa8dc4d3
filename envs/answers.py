"""Finding the answer in a completion and comparing it with the ground truth.

`math_equivalent` uses math_verify (sympy), whose timeouts are SIGALRM alarms: they only work on the main thread.
`fallback_equivalent` is the sympy-free comparison used off the main thread, or when math_verify times out or
fails: exact rational comparison of numbers written as integers, decimals, "a/b" or "\\frac{a}{b}", else a
whitespace- and "$"-insensitive string comparison. It cannot hang. It finds numbers by math_verify's rules (see
`_NUMBER_TOKEN`) so that a reward does not depend on the thread that scores it; where math_verify knows more
(symbolic equality, evaluating "3+4"), the fallback rejects rather than guesses.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Literal

Extract = Literal["full", "first_line", "answer_tag"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A number: optional sign, digits with optional thousands commas ("1,000"), optional decimals.
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)"
_FRAC = re.compile(rf"(-?)\\[dt]?frac\{{({_NUM})\}}\{{({_NUM})\}}")
_RATIO = re.compile(rf"({_NUM})/({_NUM})")
# A number in a completion, found as math_verify's expression extractor finds one, so that the fallback accepts no
# answer that math_verify rejects: it starts the text or follows whitespace, "=" or "$" (a currency or LaTeX
# delimiter), so "x7", "+7" and "(7)" hold no number; it does not go on with more digits after "," or "." ("7,8" is
# 7.8 to math_verify). An arithmetic expression ("3 + 4", "2^3", "1/2") is one token: `to_fraction` reads a ratio
# and rejects the rest, which math_verify would evaluate and the fallback cannot.
_UNSIGNED = _NUM.removeprefix("[-+]?")
_OPS = r"+\-*/^×÷"
_EXPRESSION = rf"\(?-?\d[\d.,\s{_OPS}()]*[{_OPS}][\d.,\s{_OPS}()]*\d\)?"
_NUMBER_TOKEN = re.compile(
    rf"(?:^|(?<=[\s=$]))(?:-?\\[dt]?frac\{{{_NUM}\}}\{{{_NUM}\}}|{_EXPRESSION}|-?{_UNSIGNED})(?![.,]?\d)"
)


def extract_answer(text: str, how: Extract) -> str | None:
    """The part of `text` to compare: all of it, its first non-empty line, or the last <answer>...</answer>."""
    if how == "full":
        return text
    if how == "first_line":
        return next((line for line in text.splitlines() if line.strip()), "")
    tags = _ANSWER_TAG.findall(text)
    return tags[-1] if tags else None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def _number(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def to_fraction(text: str) -> Fraction | None:
    """`text` as an exact rational if it is one number ("-3", "0.5", "1,000", "1/2", "\\frac{1}{2}"), else None."""
    s = text.strip().strip("$").replace(" ", "").rstrip(".")
    try:
        if m := _FRAC.fullmatch(s):
            value = _number(m[2]) / _number(m[3])
            return -value if m[1] else value
        if m := _RATIO.fullmatch(s):
            return _number(m[1]) / _number(m[2])
        return _number(s) if re.fullmatch(_NUM, s) else None
    except ZeroDivisionError:
        return None


def _squash(text: str) -> str:
    return re.sub(r"\s+|\$", "", text).casefold()


def fallback_equivalent(prediction: str, gold: str) -> bool:
    """Sympy-free equivalence: numeric gold is compared exactly with the last number (see `_NUMBER_TOKEN`) of the
    prediction's last \\boxed{} or, without one, of the whole prediction; other gold is compared as a string,
    ignoring whitespace, "$" and case."""
    gold_answer = last_boxed(gold) or gold
    gold_value = to_fraction(gold_answer)
    region = last_boxed(prediction) or prediction
    if gold_value is None:
        return _squash(region) == _squash(gold_answer)
    numbers = _NUMBER_TOKEN.findall(region)
    return bool(numbers) and to_fraction(numbers[-1]) == gold_value


def math_equivalent(prediction: str, gold: str, timeout_s: int) -> bool:
    """math_verify's verdict (parse both, verify gold against prediction) within `timeout_s` per call.

    Raises math_verify's TimeoutException, or ValueError when the gold cannot be parsed; main thread only.
    """
    from math_verify import parse, verify  # lazy: sympy takes a second to import

    gold_parsed = parse(gold, parsing_timeout=timeout_s, raise_on_error=True)
    if not gold_parsed:  # bare LaTeX gold such as "x+1" is only found between math delimiters
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout_s, raise_on_error=True)
    if not gold_parsed:
        raise ValueError(f"math_verify cannot parse the ground truth {gold!r}")
    predicted = parse(prediction, parsing_timeout=timeout_s, raise_on_error=True)
    return bool(verify(gold_parsed, predicted, timeout_seconds=timeout_s, raise_on_error=True))


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
