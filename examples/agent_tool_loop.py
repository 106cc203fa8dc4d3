"""A small tool-using agent trained through the Slipstream agent proxy (needs only `openai` and `httpx`).

Each episode is one session: the agent asks the policy an arithmetic question through the OpenAI client pointed at
`<proxy>/v1/sessions/<session id>`; whenever a reply ends with a calculator call `<calc>EXPR</calc>` it runs the
tool and sends the result back as a tool message; the final reply is scored against the right answer and posted as
the session's reward. The proxy turns the session into one trajectory on the bus: the policy's tokens are trained
on, the tool results and chat-template tokens between turns are masked out.

    slipstream rollout --config configs/demo.toml --rollout.proxy_port 8000
    python examples/agent_tool_loop.py --proxy http://127.0.0.1:8000 --episodes 8

With `rollout.proxy_token_file` (or SLIPSTREAM_PROXY_TOKEN) set on the node, export the same token as
SLIPSTREAM_PROXY_TOKEN here. It prints one JSON line: {"episodes": ..., "mean_reward": ..., "trajectories": [...]}.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import os
import random
import re
import uuid

import httpx
import openai

SYSTEM = "Answer with the number only. To compute, write <calc>EXPRESSION</calc> and wait for the <result>."
CALL = re.compile(r"<calc>(.{1,100}?)</calc>\s*$", re.DOTALL)  # a calculator call that ends the reply
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(expression: str) -> str:
    """The tool: + - * / over numbers (anything else is reported back as an error, as a real tool would)."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("unsupported expression")

    try:
        result = value(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as exc:
        return f"error: {exc}"
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


def run_episode(proxy: str, token: str | None, question: str, answer: str, max_turns: int, max_tokens: int) -> dict:
    """One session: up to `max_turns` policy turns with tool calls in between, then the reward. Returns the
    proxy's answer to the reward ({"session_id", "trajectory_id", "published"}) plus the reward."""
    session = uuid.uuid4().hex
    client = openai.OpenAI(base_url=f"{proxy}/v1/sessions/{session}", api_key=token or "unused", max_retries=3)
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    for _ in range(max_turns):
        completion = client.chat.completions.create(
            model="policy", messages=messages, max_tokens=max_tokens, temperature=1.0, stop=["</calc>"]
        )
        reply = completion.choices[0].message.content or ""  # keeps a matched stop string, so the call is visible
        messages.append({"role": "assistant", "content": reply})
        call = CALL.search(reply)
        if call is None:
            break
        messages.append({"role": "tool", "content": f"<result>{calculate(call.group(1))}</result>"})
    final = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    reward = 1.0 if final.strip() == answer else 0.0
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"reward": reward, "rewards": {"correct": reward}, "meta": {"question": question}}
    posted = httpx.post(f"{proxy}/v1/sessions/{session}/reward", json=body, headers=headers, timeout=60)
    posted.raise_for_status()
    return {**posted.json(), "reward": reward}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default="http://127.0.0.1:8000", help="the rollout node's agent proxy")
    parser.add_argument("--episodes", type=int, default=4, help="sessions to run")
    parser.add_argument("--max-turns", type=int, default=3, help="policy turns per episode")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per policy turn")
    parser.add_argument("--seed", type=int, default=0, help="seeds the questions")
    args = parser.parse_args(argv)
    token = os.environ.get("SLIPSTREAM_PROXY_TOKEN") or None
    rng = random.Random(args.seed)
    results = []
    for _ in range(args.episodes):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        results.append(run_episode(args.proxy, token, f"{a}+{b}=", str(a + b), args.max_turns, args.max_tokens))
    mean = sum(r["reward"] for r in results) / max(1, len(results))
    summary = {"episodes": len(results), "mean_reward": mean, "trajectories": [r["trajectory_id"] for r in results]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
