"""Multi-turn environments: the policy and an environment take turns inside one response.

An episode: the policy generates a turn (until one of the environment's `stop` strings or end of sequence), the
environment reads it and either ends the episode or answers with text that is appended to the response. The
policy's tokens carry their behaviour logprobs and loss_mask 1; the environment's tokens carry logprob 0.0 and
loss_mask 0, so the learner never trains on text the policy did not write. Policy tokens are kept exactly as
generated (never re-tokenized), so the logprobs stay aligned.

The rollout node drives `run_episode` with its engine; rewards score `Episode.text` like any completion.
"""

from __future__ import annotations

import ast
import operator
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from envs.plugins import import_object
from envs.rows import PromptRow


@dataclass(frozen=True)
class EnvReply:
    """The environment's answer to a policy turn: `text` to append (when not `done`), or the end of the episode."""

    text: str
    done: bool


@dataclass(frozen=True)
class PolicyTurn:
    """One generated turn. ids: [t] token ids; logprobs: [t] behaviour logprobs; text: the decoded ids;
    finish_reason: "stop" (stop string or EOS) or "length" (the engine's token budget ran out: the episode ends)."""

    ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str = "stop"


@dataclass
class Episode:
    """The response after the prompt, policy and environment segments in order.

    response_ids: [T] token ids; logprobs: [T] behaviour logprobs (0.0 on environment tokens);
    loss_mask: [T] 1 on policy tokens, 0 on environment tokens; text: the response as text;
    turns: policy turns taken; finish_reason: "done" (the environment ended it), "max_turns" or "length".
    """

    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    text: str = ""
    turns: int = 0
    finish_reason: str = ""

    def append(self, ids: list[int], logprobs: list[float], text: str, *, policy: bool) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"episode segment: {len(ids)} token ids but {len(logprobs)} logprobs")
        self.response_ids += ids
        self.logprobs += logprobs
        self.loss_mask += [1 if policy else 0] * len(ids)
        self.text += text


class Environment(ABC):
    """Takes turns with the policy. Subclasses set `stop` (the engine's stop strings for a policy turn, kept in the
    output) and implement `step`; `reset` starts an episode for a row (the default keeps no state)."""

    stop: tuple[str, ...] = ()

    def reset(self, row: PromptRow) -> None:  # noqa: B027 - optional hook: stateless environments keep the default
        """Start an episode for `row`."""

    @abstractmethod
    def step(self, turn: str) -> EnvReply:
        """Answer the policy's latest turn (its text)."""


async def run_episode(
    env: Environment,
    row: PromptRow,
    prompt_ids: list[int],
    generate: Callable[[list[int]], Awaitable[PolicyTurn]],
    tokenizer: Any,
    max_turns: int,
) -> Episode:
    """Alternate `generate(prompt_ids + response_ids so far)` and `env.step` for at most `max_turns` policy turns.

    `generate` must stop at `env.stop` (and keep the stop string); environment text is encoded with
    `tokenizer.encode(text, add_special_tokens=False)`.
    """
    env.reset(row)
    episode = Episode()
    while True:
        turn = await generate(prompt_ids + episode.response_ids)
        episode.append(turn.ids, turn.logprobs, turn.text, policy=True)
        episode.turns += 1
        if turn.finish_reason == "length":
            episode.finish_reason = "length"
            return episode
        if episode.turns >= max_turns:
            episode.finish_reason = "max_turns"
            return episode
        reply = env.step(turn.text)
        if reply.done:
            episode.finish_reason = "done"
            return episode
        ids = tokenizer.encode(reply.text, add_special_tokens=False)
        episode.append(ids, [0.0] * len(ids), reply.text, policy=False)


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64


def calculate(expression: str) -> int | float:
    """Evaluate +, -, *, /, //, %, ** and parentheses over number literals; anything else is a ValueError.

    Bounded so that a policy cannot stall the node: at most MAX_EXPRESSION_CHARS characters, |exponent| at most
    MAX_EXPONENT.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from exc

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
            try:
                return _BINARY[type(node.op)](left, right)
            except ZeroDivisionError as exc:
                raise ValueError("division by zero") from exc
        raise ValueError(f"unsupported syntax: {ast.dump(node)[:60]}")

    result = value(tree.body)
    if isinstance(result, complex):  # a fractional power of a negative number
        raise ValueError("the result is not a real number")
    return int(result) if isinstance(result, float) and result.is_integer() else result


class CalculatorEnv(Environment):
    """A calculator tool. A turn that ends with `<calc>EXPR</calc>` gets `<result>VALUE</result>` (or
    `<result>error: ...</result>`) appended; a turn without a call at its end ends the episode, its final answer
    in `<answer>...</answer>` for the rewards (e.g. exact_match with extract="answer_tag")."""

    stop = ("</calc>",)

    def step(self, turn: str) -> EnvReply:
        start = turn.rfind("<calc>")
        if start < 0:
            return EnvReply("", done=True)
        expression, _, after = turn[start + len("<calc>") :].partition("</calc>")
        if after.strip():  # the call is not what ended the turn: the policy went on to answer
            return EnvReply("", done=True)
        try:
            value = calculate(expression)
            result = str(value) if isinstance(value, int) else f"{value:.12g}"
        except (ValueError, OverflowError) as exc:
            result = f"error: {exc}"
        return EnvReply(f"<result>{result}</result>", done=False)


BUILTIN_ENVIRONMENTS: dict[str, type[Environment]] = {"calculator": CalculatorEnv}


def make_environment(spec: str) -> Environment | None:
    """The environment named by TaskConfig.environment: '' = none (single turn), a built-in name, or an import path
    'package.module:Class' of an Environment subclass built without arguments."""
    if not spec:
        return None
    cls = BUILTIN_ENVIRONMENTS.get(spec) or import_object(spec)
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ValueError(f"environment {spec!r}: not an Environment subclass")
    return cls()
