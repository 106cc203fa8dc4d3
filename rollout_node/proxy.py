"""The agent proxy: OpenAI-compatible routes in front of the node's engine; an agent session becomes ONE trajectory.

Routes (errors as OpenAI's `{"error": {"message", "type", "param", "code"}}`):

    GET    /v1/models
    POST   /v1/completions, /v1/chat/completions                        generate; nothing is recorded
    POST   /v1/sessions/{id}/completions, /v1/sessions/{id}/chat/completions
                                                                        generate and record into session {id}
    POST   /v1/sessions/{id}/reward   {"reward": 1.0, "rewards": {...}, "group_id": "...", "meta": {...}}
    DELETE /v1/sessions/{id}                                            drop the session (abandoned)

Generation answers JSON, or with `stream: true` OpenAI's server-sent events, sent as the engine generates
(`rollout_node.streaming`); chat takes `tools` and returns parsed
`tool_calls` (`rollout.proxy_tool_parser`). Sessions are named by the path, so an agent points an OpenAI client at
`<proxy>/v1/sessions/<id>` and needs nothing else. A session's calls must continue one token stream: each call's
prompt must start with the previous prompt plus the previous response (an agent appends the assistant's reply and
tool/user turns, as usual). The proxy generates from the session's own tokens followed by the new ones, so what the
model saw is exactly what is trained on: tokens it generated have loss_mask 1 and their behaviour logprobs, the
rest (tool results, user turns, template tokens between turns) loss_mask 0 and logprob 0. A prompt that does not
extend the session is refused with 409.
Returned text keeps a matched stop string (vLLM's include_stop_str_in_output), so the history stays aligned.

The reward ends the session: its token stream is published as one `Trajectory` (group of one unless `group_id` is
given). Repeating the reward call answers with the same trajectory id and publishes nothing. A session idle for
`proxy_session_ttl_s` is dropped, counted as abandoned. While new weights are being loaded, generation routes
answer 503 with Retry-After rather than mix versions; calls already running record the switch in version_ranges.
When a token is configured, every POST and DELETE needs `Authorization: Bearer <token>` (401 otherwise).
Sessions and their store are `rollout_node.sessions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus.schema import MessageError, Sampling, Trajectory, new_id
from rollout_node.config import NAME_PATTERN, RolloutConfig, ToolParser
from rollout_node.engines.base import Engine, OnToken, Sample, error_reason
from rollout_node.sessions import ProxyError, RewardRequest, Session, SessionStore
from rollout_node.streaming import Tokens, logprob_entries, sse_events
from rollout_node.tool_calls import call_start, parse_tool_calls
from telemetry.http import ServerHandle, serve_in_thread
from telemetry.metrics import ROLLOUT_ENGINE_ERRORS, ROLLOUT_PROXY_SESSIONS

log = structlog.get_logger(__name__)

Publish = Callable[[Sequence[Trajectory]], Any]
Reply = dict[str, Any] | StreamingResponse
START_TIMEOUT_S = 30.0  # the proxy's HTTP server must be listening within this long
STOP_TIMEOUT_S = 10.0  # calls in flight get this long to finish when the proxy stops


# --- requests --------------------------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields that change nothing here (user, ...)

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_usage: a last chunk with the usage
    # Fields that would change what is sampled: accepted only at their neutral value (the engine has no such knob,
    # and training on samples drawn otherwise than the agent asked would be wrong), refused naming them otherwise.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        """400 naming the first field set to something this proxy cannot do."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ProxyError(400, f"{name}: penalties are not supported (send 0 or leave it out)", name)
        if self.logit_bias:
            raise ProxyError(400, "logit_bias: not supported (send {} or leave it out)", "logit_bias")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            kind = self.response_format.get("type")
            raise ProxyError(400, f"response_format: only 'text' is supported (got {kind!r})", "response_format")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, tool_call_id, name: handed to the chat template

    role: str = Field(min_length=1, max_length=64)
    content: str | list[ContentPart] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0)  # only the sampled token's logprob is known
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None  # rendered by the chat template; calls parsed by proxy_tool_parser
    tool_choice: Literal["auto", "none"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None  # OpenAI's deprecated form of tools: refused, naming tools
    function_call: str | dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise ProxyError(400, f"{name}: deprecated by OpenAI and not supported: send tools", name)
        if isinstance(self.tool_choice, dict):
            raise ProxyError(400, "tool_choice: a forced function is not supported ('auto' or 'none')", "tool_choice")


TokenId = Annotated[int, Field(ge=0, lt=2**31)]  # what a tokenizer can take at all (the engine checks the vocabulary)


class CompletionRequest(_Request):
    prompt: str | list[TokenId]
    logprobs: int | None = Field(None, ge=0, le=0)  # 0: the sampled token's logprob only
    echo: Literal[False] = False


@dataclass(frozen=True)
class _Plan:
    """A checked generation: the whole prompt [P] (the session's tokens + `context`, the call's new tokens), the
    sampling, n, and the session it records into (claimed: busy)."""

    prompt_ids: list[int]
    context: list[int]
    sampling: Sampling
    n: int
    session: Session | None


# --- the proxy -------------------------------------------------------------------------------------------------
class AgentProxy:
    """The proxy's FastAPI `app` and its HTTP server (uvicorn in a daemon thread: `start`, `stop`, `url`).

    `publish` sends trajectories to the bus (the node's `Publisher.publish`); `updating()` says whether new weights
    are being loaded; `producer` names the trajectories' producer."""

    def __init__(
        self,
        config: RolloutConfig,
        engine: Engine,
        tokenizer: Any,
        publish: Publish,
        updating: Callable[[], bool],
        producer: str,
        model_name: str = "slipstream",
    ) -> None:
        self.config, self.engine, self.tokenizer = config, engine, tokenizer
        self.publish, self.updating, self.producer = publish, updating, producer
        self.model_name = config.proxy_model_name or model_name
        self.token = config.proxy_token()
        self.sessions = SessionStore(config.proxy_session_ttl_s, config.proxy_max_sessions)
        self.created = int(time.time())
        self.app = self._build_app()
        self._server: ServerHandle | None = None
        self._running: set[asyncio.Task[Any]] = set()  # streamed generations (a task needs a strong reference)

    # --- server --------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "the proxy is not started"
        wildcard = self.config.proxy_host in ("0.0.0.0", "::")
        return f"http://{socket.gethostname() if wildcard else self.config.proxy_host}:{self._server.port}"

    def start(self) -> AgentProxy:
        """Serve on `proxy_host:proxy_port` (0: a free port, see `url`); returns once listening."""
        assert self.config.proxy_port is not None, "rollout.proxy_port is not set"
        self._server = serve_in_thread(self.app, self.config.proxy_host, self.config.proxy_port, START_TIMEOUT_S,
                                       lifespan=True)  # fmt: skip
        log.info("agent proxy serving", url=self.url, token_required=self.token is not None)
        return self

    def stop(self) -> None:
        """Stop listening; calls in flight get STOP_TIMEOUT_S to finish; open sessions are abandoned."""
        if self._server is None:
            return
        self._server.stop(STOP_TIMEOUT_S)
        for session_id in list(self.sessions.open):
            self.sessions.drop(session_id)

    # --- routes --------------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            sweeper = asyncio.create_task(self._sweep_forever())
            yield
            sweeper.cancel()

        app = FastAPI(title="Slipstream agent proxy", lifespan=lifespan, docs_url=None, redoc_url=None)
        app.add_exception_handler(ProxyError, _error_response)  # type: ignore[arg-type]
        app.get("/v1/models")(self.models)
        for prefix in ("/v1", "/v1/sessions/{session_id}"):  # a JSON body, or server-sent events: no response model
            app.post(f"{prefix}/completions", response_model=None)(self.completions)
            app.post(f"{prefix}/chat/completions", response_model=None)(self.chat_completions)
        app.post("/v1/sessions/{session_id}/reward")(self.reward)
        app.delete("/v1/sessions/{session_id}")(self.drop_session)
        return app

    async def models(self) -> dict[str, Any]:
        model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "slipstream"}
        return {"object": "list", "data": [model]}

    async def chat_completions(self, request: Request, session_id: str | None = None) -> Reply:
        body = await self._read(request, ChatRequest)
        body.refuse_unsupported()
        if not getattr(self.tokenizer, "chat_template", None):
            raise ProxyError(400, "this model has no chat template: use /v1/completions", "messages")
        open_session = self.sessions.open.get(session_id) if session_id is not None else None
        generated = open_session.tool_texts if open_session is not None else {}
        messages = [_template_message(m, i, generated) for i, m in enumerate(body.messages)]
        tools = body.tools if body.tool_choice != "none" else None
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (roles it does not know, ...)
            raise ProxyError(400, f"messages: the chat template refused them: {exc}", "messages") from exc
        prompt_ids = list(self.tokenizer.encode(text, add_special_tokens=False))  # the template wrote them
        max_tokens = body.max_completion_tokens or body.max_tokens
        plan = self._plan(body, prompt_ids, text, max_tokens, session_id)
        parser = self.config.proxy_tool_parser if tools else "none"

        def reply(prompt: list[int], samples: list[Sample]) -> dict[str, Any]:
            return self._chat_reply(body, prompt, samples, parser, session_id)

        if body.stream:
            return self._stream(body, plan, reply, chat=True, hold=call_start(parser))
        return reply(*await self._run(plan))

    def _chat_reply(
        self, body: ChatRequest, prompt: list[int], samples: list[Sample], parser: ToolParser, session_id: str | None
    ) -> dict[str, Any]:
        """The chat.completion body of `samples`; tool calls parsed with `parser` (and remembered by the session, to
        render them back as generated)."""
        choices = []
        for i, sample in enumerate(samples):
            logprobs = None
            if body.logprobs:
                logprobs = {"content": logprob_entries(self.tokenizer, sample.response_ids, sample.behavior_logprobs)}
            content, calls = parse_tool_calls(sample.text, parser)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
                if session_id is not None:  # the agent sends these calls back: they render as what was generated
                    written = self._written_back(sample)
                    self.sessions.get(session_id, create=False).tool_texts.update((c["id"], written) for c in calls)
            finish = "tool_calls" if calls else sample.finish_reason
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return self._reply("chat.completion", "chatcmpl-", choices, prompt, samples)

    async def completions(self, request: Request, session_id: str | None = None) -> Reply:
        body = await self._read(request, CompletionRequest)
        body.refuse_unsupported()
        if isinstance(body.prompt, str):
            text, prompt_ids = body.prompt, list(self.tokenizer.encode(body.prompt))
        else:
            text, prompt_ids = self.tokenizer.decode(body.prompt), list(body.prompt)
        if not prompt_ids:
            raise ProxyError(400, "prompt: must not be empty", "prompt")
        plan = self._plan(body, prompt_ids, text, body.max_tokens, session_id)

        def reply(prompt: list[int], samples: list[Sample]) -> dict[str, Any]:
            choices = []
            for i, sample in enumerate(samples):
                logprobs = None
                if body.logprobs is not None:
                    logprobs = {
                        "tokens": self.tokenizer.convert_ids_to_tokens(sample.response_ids),
                        "token_logprobs": sample.behavior_logprobs,
                        "top_logprobs": None,
                        "text_offset": None,
                    }
                choice = {"index": i, "text": sample.text, "logprobs": logprobs, "finish_reason": sample.finish_reason}
                choices.append(choice)
            return self._reply("text_completion", "cmpl-", choices, prompt, samples)

        if body.stream:
            return self._stream(body, plan, reply, chat=False, hold=None)
        return reply(*await self._run(plan))

    async def reward(self, request: Request, session_id: str) -> dict[str, Any]:
        """End the session: publish its trajectory (once; a repeated call answers with the same id)."""
        body = await self._read(request, RewardRequest)
        if session_id in self.sessions.published:
            trajectory_id = self.sessions.published[session_id][0]
            return {"session_id": session_id, "trajectory_id": trajectory_id, "published": False}
        session = self.sessions.get(session_id, create=False)
        if session.busy:
            raise ProxyError(409, f"session {session_id}: a completion of it is still running", "session_id")
        trajectory = session.trajectory(body, self.producer)  # 409 when nothing was generated yet
        session.busy = True
        try:
            await asyncio.to_thread(self.publish, [trajectory])
        except MessageError as exc:  # e.g. longer than bus.max_tokens: the learner could not take it either
            self.sessions.open.pop(session_id, None)
            ROLLOUT_PROXY_SESSIONS.labels("rejected").inc()
            raise ProxyError(400, f"session {session_id}: the trajectory is invalid: {exc}", exc.field) from exc
        except Exception as exc:  # the bus: the session stays open, the agent may retry
            ROLLOUT_PROXY_SESSIONS.labels("error").inc()
            log.exception("publishing a session failed", session=session_id)
            message = f"session {session_id}: publishing failed, retry: {exc}"
            raise ProxyError(503, message, headers=self._retry_after()) from exc
        finally:
            session.busy = False
        self.sessions.finish(session_id, trajectory.id)
        ROLLOUT_PROXY_SESSIONS.labels("published").inc()
        log.info("agent session published", session=session_id, trajectory_id=trajectory.id, tokens=len(session.tokens))
        return {"session_id": session_id, "trajectory_id": trajectory.id, "published": True}

    async def drop_session(self, request: Request, session_id: str) -> dict[str, Any]:
        self._authorize(request)
        if not self.sessions.drop(session_id):
            raise ProxyError(404, f"session {session_id}: not open", "session_id")
        return {"session_id": session_id, "dropped": True}

    # --- helpers -------------------------------------------------------------------------------------------------
    def _plan(
        self, body: _Request, prompt_ids: list[int], text: str, max_tokens: int | None, session_id: str | None
    ) -> _Plan:
        """Check the request (ProxyError naming the field) and claim its session, if any, until `_run` ends."""
        if body.n > self.config.proxy_max_n:
            raise ProxyError(400, f"n: must be <= {self.config.proxy_max_n} (rollout.proxy_max_n)", "n")
        if max_tokens is not None and max_tokens > self.config.proxy_max_tokens:
            limit = self.config.proxy_max_tokens
            raise ProxyError(400, f"max_tokens: must be <= {limit} (rollout.proxy_max_tokens)", "max_tokens")
        if self.updating():
            raise ProxyError(503, "new weights are being loaded: retry shortly", headers=self._retry_after())
        session, context = None, prompt_ids
        if session_id is not None:
            if body.n != 1:
                raise ProxyError(400, "n: must be 1 inside a session (a session is one token stream)", "n")
            session = self.sessions.get(_session_name(session_id), create=True)
            if session.busy:
                raise ProxyError(409, f"session {session_id}: another completion of it is running", "session_id")
            context = session.continuation(prompt_ids, text, self.tokenizer)
            prompt_ids = session.tokens + context if session.prompt_ids else context
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        sampling = Sampling(
            temperature=body.temperature,
            top_p=body.top_p,
            max_new_tokens=max_tokens or self._default_max_tokens(len(prompt_ids)),
            stop=stop,
            seed=body.seed,
        )
        if session is not None:
            session.busy = True
        return _Plan(prompt_ids, context, sampling, body.n, session)

    async def _run(self, plan: _Plan, on_token: OnToken | None = None) -> tuple[list[int], list[Sample]]:
        """Generate what `plan` asks, recording into its session if there is one, and release the session; returns
        (the prompt generated from, the samples)."""
        session = plan.session
        try:
            [samples] = await asyncio.to_thread(
                self.engine.generate, [plan.prompt_ids], plan.sampling, plan.n, on_token=on_token
            )
        except ValueError as exc:
            raise ProxyError(400, str(exc)) from exc
        except Exception as exc:
            ROLLOUT_ENGINE_ERRORS.labels(error_reason(exc)).inc()
            log.exception("proxy generation failed")
            raise ProxyError(500, f"generation failed: {exc!r}") from exc
        finally:
            if session is not None:
                session.busy = False
                session.last_used = time.monotonic()
        if any(s.finish_reason == "abort" or not s.response_ids for s in samples):
            raise ProxyError(503, "generation was aborted (the node is stopping)", headers=self._retry_after())
        if session is not None:
            session.add(plan.context, samples[0])
        return plan.prompt_ids, samples

    def _written_back(self, sample: Sample) -> str:
        """A reply's text as the chat template must write it back for the session to stay one token stream: special
        tokens kept (a reply with one inside re-tokenizes to the same ids; `sample.text` drops them), a final eos
        left out (the template ends the turn with its own)."""
        ids = sample.response_ids
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _default_max_tokens(self, prompt_tokens: int) -> int:
        """proxy_max_tokens, or fewer when the model's context (the tokenizer's model_max_length) leaves less room."""
        context = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(context, int) and context < 2**31:
            if prompt_tokens >= context:
                raise ProxyError(400, f"prompt: {prompt_tokens} tokens leave no room in the context of {context}")
            return min(self.config.proxy_max_tokens, context - prompt_tokens)
        return self.config.proxy_max_tokens

    def _reply(
        self, kind: str, prefix: str, choices: list[Any], prompt: list[int], samples: list[Sample]
    ) -> dict[str, Any]:
        """The OpenAI response body, plus `policy_version`: the version of the first sample's first token."""
        completion_tokens = sum(len(s.response_ids) for s in samples)
        return {
            "id": prefix + new_id(),
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": completion_tokens,
                "total_tokens": len(prompt) + completion_tokens,
            },
            "policy_version": samples[0].policy_version,
        }

    def _stream(
        self,
        body: _Request,
        plan: _Plan,
        build_reply: Callable[[list[int], list[Sample]], dict[str, Any]],
        *,
        chat: bool,
        hold: str | None,
    ) -> StreamingResponse:
        """Start generating `plan` now and answer with its server-sent events (`rollout_node.streaming`). The
        generation runs to its end even if the client goes away, so that the session records what was generated."""
        loop = asyncio.get_running_loop()
        tokens: Tokens = asyncio.Queue()

        def on_token(row: int, token_id: int, logprob: float) -> None:  # the engine's thread
            loop.call_soon_threadsafe(tokens.put_nowait, (row, token_id, logprob))

        def ended(task: asyncio.Task[Any]) -> None:
            self._running.discard(task)
            tokens.put_nowait(None)
            if not task.cancelled():
                task.exception()  # retrieved here too: the client may have left before the events read it

        task = asyncio.create_task(self._run(plan, on_token))
        self._running.add(task)
        task.add_done_callback(ended)
        kind = "chatcmpl" if chat else "cmpl"
        head = {"id": f"{kind}-{new_id()}", "created": int(time.time()), "model": self.model_name}
        events = sse_events(
            chat=chat, choices=plan.n, tokens=tokens, result=task, build_reply=build_reply, tokenizer=self.tokenizer,
            hold=hold, logprobs=bool(body.logprobs) if chat else False,
            include_usage=bool((body.stream_options or {}).get("include_usage")),
            head=head,
        )  # fmt: skip
        return StreamingResponse(events, media_type="text/event-stream")

    async def _read(self, request: Request, model: type[BaseModel]) -> Any:
        """Authorize, then read the body (at most proxy_max_request_bytes: 413) and validate it (400 naming the
        field)."""
        self._authorize(request)
        limit = self.config.proxy_max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ProxyError(413, f"request body of {declared} bytes > {limit} (rollout.proxy_max_request_bytes)")
        body = bytearray()
        try:
            async with asyncio.timeout(self.config.proxy_body_timeout_s):  # a client that stalls is not waited on
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise ProxyError(413, f"request body > {limit} bytes (rollout.proxy_max_request_bytes)")
        except TimeoutError:
            seconds = self.config.proxy_body_timeout_s
            message = f"request body not received within {seconds}s (rollout.proxy_body_timeout_s)"
            raise ProxyError(408, message) from None
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested deeper than the parser goes
            raise ProxyError(400, f"body: not JSON: {exc}") from exc
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            raise ProxyError(400, f"{where}: {err['msg']} (got {err.get('input')!r:.80})", where) from exc

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise ProxyError(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.proxy_retry_after_s)}

    async def _sweep_forever(self) -> None:
        interval = min(self.config.proxy_session_ttl_s / 4, 5.0)
        while True:
            await asyncio.sleep(interval)
            self.sessions.sweep()


def _session_name(session_id: str) -> str:
    if len(session_id) > 128 or not re.fullmatch(NAME_PATTERN, session_id):
        raise ProxyError(400, f"session_id: must match {NAME_PATTERN} and be at most 128 characters", "session_id")
    return session_id


def _template_message(message: ChatMessage, index: int, generated: dict[str, str]) -> dict[str, Any]:
    """A message as the chat template takes it: text parts joined; other content types are refused. An assistant
    message whose tool calls this session generated renders as the text the model wrote (`generated`, by call id),
    not as the template would write those calls: so the session stays one token stream."""
    out = message.model_dump(exclude_none=True)
    call_ids = [c.get("id") for c in out.get("tool_calls") or [] if isinstance(c, dict)]
    if message.role == "assistant" and call_ids and all(i in generated for i in call_ids):
        return {"role": "assistant", "content": generated[call_ids[0]]}
    if isinstance(message.content, list):
        if any(part.type != "text" or part.text is None for part in message.content):
            raise ProxyError(400, f"messages[{index}].content: only text parts are supported", "messages")
        out["content"] = "".join(part.text or "" for part in message.content)
    out.setdefault("content", "")
    return out


async def _error_response(_: Request, exc: ProxyError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
