"""A tool-using agent trained through the Slipstream agent proxy, written against the plain `openai` client.

The task: "Draw a number and tell me which it is." The agent offers the policy one OpenAI tool, `draw_number` (no
arguments), whose result is a random digit drawn per episode: the right answer is only knowable from the tool. Each
episode is one proxy session (`base_url = <proxy>/v1/sessions/<id>`): the agent streams a chat completion
(`stream=True`, `tools=[...]`), assembles the deltas (text and tool-call deltas), runs each call and sends its
result back as a `role: "tool"` message, until a reply calls no tool (its text is the final answer) or `--max-turns`
replies were given. It then posts the session's reward, and the proxy publishes the session as one trajectory:
the policy's tokens with loss_mask 1, the tool results and template tokens between turns with loss_mask 0.
Episodes come in groups of `--group-size` sharing a `group_id`, so that the learner trains them as GRPO groups.

The reward (shaped, and said so: a random policy would otherwise see 0 on almost every episode):
    0 when the tool was never called (an answer without the tool is a guess) or no answer came (every reply called);
    else 0.2 for the call, + 0.1 when the answer starts with a digit, + 0.1 when the answering reply ended by itself
    (not cut off at --max-tokens), + 0.5 when it starts with the drawn digit, + 1.0 when the answer is exactly the
    drawn digit (a success).

    slipstream up --config configs/agent-tools.toml          # the learner, a rollout node with the proxy, this agent
    python examples/agent_tool_loop.py --proxy http://127.0.0.1:8000 --episodes 64   # against a running proxy

docs/agents.md has the learning curve of the first command, and what it does not learn.

The proxy is `--proxy`, else $SLIPSTREAM_PROXY_URL (set by `slipstream up`); a proxy token, when the node has one,
is $SLIPSTREAM_PROXY_TOKEN. Every `--report-every` episodes it prints one JSON line, {"episodes": N, "success": ...,
"called": ..., "reward": ...} over those episodes, and at the end the same over all of them plus "trajectories".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import httpx
import openai

QUESTION = "Draw a number and tell me which it is."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "draw_number",
            "description": "Draw a random digit (0 .. --choices - 1).",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]
CALL_CREDIT, DIGIT_CREDIT, ENDED_CREDIT, NUMBER_CREDIT, EXACT_CREDIT = 0.2, 0.1, 0.1, 0.5, 1.0
REWARD_ATTEMPTS = 5  # a reward call answered 503 (publishing failed, the node stopping) is retried this often


@dataclass
class Episode:
    """What one session did: the digit the tool drew, as the model last saw it (None: never shown), the final
    answer (None: every reply called the tool), the reward."""

    drawn: str | None
    answer: str | None
    reward: float
    trajectory_id: str

    @property
    def success(self) -> bool:
        return self.drawn is not None and self.answer == self.drawn


def score(drawn: str | None, answer: str | None, ended: bool) -> float:
    """The shaped reward of the module docstring; `ended`: the answering reply ended by itself."""
    if drawn is None or answer is None:
        return 0.0
    text = answer.strip()
    reward = CALL_CREDIT
    reward += DIGIT_CREDIT * text[:1].isdigit()
    reward += ENDED_CREDIT * ended
    reward += NUMBER_CREDIT * text.startswith(drawn)
    reward += EXACT_CREDIT * (text == drawn)
    return reward


def streamed_reply(
    client: openai.OpenAI, messages: list[dict[str, Any]], max_tokens: int, temperature: float
) -> dict[str, Any]:
    """One streamed chat completion, assembled into the assistant message OpenAI would have returned whole (plus its
    `finish_reason`, which the agent keeps out of the history it sends back)."""
    stream = client.chat.completions.create(
        model="policy", messages=messages, tools=TOOLS, max_tokens=max_tokens, temperature=temperature, stream=True
    )
    content: list[str] = []
    finish_reason = None
    calls: dict[int, dict[str, str]] = {}  # tool-call deltas by index: the id and name come once, arguments in pieces
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        finish_reason = chunk.choices[0].finish_reason or finish_reason
        content.append(delta.content or "")
        for call in delta.tool_calls or []:
            slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] = call.id or slot["id"]
            if call.function is not None:
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None, "finish_reason": finish_reason}
    if calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(calls.items())
        ]
    return message


def run_tool(name: str, arguments: str, rng: random.Random, choices: int) -> str:
    """The tools, as a real agent runs them: an unknown tool or bad arguments come back as an error message.
    `draw_number` draws one of the digits 0 .. choices - 1."""
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        return "error: arguments are not JSON"
    if name != "draw_number" or args:
        return f"error: no tool {name!r} with arguments {args!r}"
    return str(rng.randrange(choices))


def run_episode(
    proxy: str,
    http: httpx.Client,
    token: str | None,
    group_id: str,
    seed: int,
    args: argparse.Namespace,
) -> Episode:
    """One session: up to `args.max_turns` streamed replies with tool results in between, then the reward."""
    session = uuid.uuid4().hex
    rng = random.Random(seed)
    client = openai.OpenAI(
        base_url=f"{proxy}/v1/sessions/{session}", api_key=token or "unused", http_client=http, max_retries=5
    )
    messages: list[dict[str, Any]] = [{"role": "user", "content": QUESTION}]
    drawn: str | None = None
    answer: str | None = None
    ended = called = False
    for turn in range(args.max_turns):
        reply = streamed_reply(client, messages, args.max_tokens, args.temperature)
        ended = reply.pop("finish_reason") == "stop"
        messages.append(reply)
        if "tool_calls" not in reply:
            answer = reply["content"] or ""
            break
        called = True
        if turn == args.max_turns - 1:
            break  # no reply would follow: these calls are not run (their results would never reach the model)
        for call in reply["tool_calls"]:
            result = run_tool(call["function"]["name"], call["function"]["arguments"], rng, args.choices)
            drawn = result if result.isdigit() else drawn
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    reward = score(drawn, answer, ended)
    body = {
        "reward": reward,
        "rewards": {"correct": float(drawn is not None and answer == drawn), "called": float(called)},
        "group_id": group_id,
        "meta": {"drawn": drawn, "answer": answer},
    }
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for attempt in range(REWARD_ATTEMPTS):
        posted = http.post(f"{proxy}/v1/sessions/{session}/reward", json=body, headers=headers, timeout=60)
        if posted.status_code != 503 or attempt == REWARD_ATTEMPTS - 1:
            break
        time.sleep(float(posted.headers.get("retry-after", 1)))
    posted.raise_for_status()
    return Episode(drawn, answer, reward, posted.json()["trajectory_id"])


def summary(episodes: list[Episode]) -> dict[str, Any]:
    count = max(1, len(episodes))
    return {
        "episodes": len(episodes),
        "success": round(sum(e.success for e in episodes) / count, 4),
        "called": round(sum(e.drawn is not None for e in episodes) / count, 4),
        "reward": round(sum(e.reward for e in episodes) / count, 4),
    }


def episode_numbers(episodes: int) -> Iterator[int]:
    """0, 1, ... up to `episodes` (0: until stopped)."""
    number = 0
    while episodes == 0 or number < episodes:
        yield number
        number += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default=os.environ.get("SLIPSTREAM_PROXY_URL", "http://127.0.0.1:8000"),
                        help="the rollout node's agent proxy (default: $SLIPSTREAM_PROXY_URL)")  # fmt: skip
    parser.add_argument("--episodes", type=int, default=64, help="sessions to run (0: until stopped)")
    parser.add_argument("--group-size", type=int, default=8, help="episodes per GRPO group (learner.num_generations)")
    parser.add_argument("--concurrency", type=int, default=16, help="episodes run at once")
    parser.add_argument("--max-turns", type=int, default=3, help="policy replies per episode")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per policy reply")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature (the learner's learner.temperature must be the same)")  # fmt: skip
    parser.add_argument("--report-every", type=int, default=64, help="episodes per progress line")
    parser.add_argument("--seed", type=int, default=0, help="seeds the tool's draws")
    parser.add_argument("--choices", type=int, default=10, choices=range(2, 11), metavar="2..10",
                        help="the tool draws a digit 0 .. choices-1: a guess succeeds 1 in choices")  # fmt: skip
    args = parser.parse_args(argv)
    token = os.environ.get("SLIPSTREAM_PROXY_TOKEN") or None
    run = uuid.uuid4().hex[:8]
    done: list[Episode] = []
    lock = threading.Lock()

    def one(number: int) -> None:
        group = f"agent-{run}-{number // args.group_size}"
        episode = run_episode(args.proxy, http, token, group, args.seed * 1_000_003 + number, args)
        with lock:
            done.append(episode)
            if len(done) % args.report_every == 0:
                print(json.dumps(summary(done[-args.report_every :])), flush=True)

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    with httpx.Client(limits=limits, timeout=120) as http, ThreadPoolExecutor(args.concurrency) as pool:
        pending: set[Future[None]] = set()
        for number in episode_numbers(args.episodes):  # at most 2 x concurrency queued: `--episodes 0` runs forever
            pending.add(pool.submit(one, number))
            if len(pending) >= 2 * args.concurrency:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()  # an episode's error ends the agent, loudly
        for future in pending:
            future.result()
    print(json.dumps({**summary(done), "trajectories": [e.trajectory_id for e in done]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
