"""The cascade's HTTP ingress: OpenAI-compatible completions and chat, routed between the small and the large tier.

The ingress holds handles to the tier deployments (Ray Serve model
composition) and never touches a model: it validates and tokenizes the
request (so a bad one never reaches a tier), asks the small tier for the
prompt's difficulty signals, scores them with the calibrated router
(`moe.difficulty`), and sends the request to the chosen tier.

NOTE: how a request is answered.
 1. Validate: body size (413), JSON and fields (400, naming the field), the
    model name (404), `max_tokens` against the deployment's limit and every
    prompt's token count against the tiers' context (400). A list of prompts
    is a batch: each prompt is routed on its own, and gets `n` choices (the
    best `n` of `best_of` candidates, by mean token log-probability), which
    all go to the tier its route chose. A chat request is its messages
    rendered by the chat template (serving/chat.py), one prompt.
 2. Route: `small`/`large` go straight to that tier; `cascade` scores the
    small tier's prefill signals and picks large when the score reaches the
    threshold; `cascade-posthoc` lets the small tier answer and escalates to
    the large one when the answer's mean token probability is below the
    confidence threshold.
 3. Degrade: when the large tier fails or exceeds `large_timeout_s`, the
    small tier answers with `degraded: true` (or, in post-hoc mode, its
    answer already made is returned). Only a request that no tier can answer
    gets a 5xx (503).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from itertools import accumulate
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.modes import CASCADE, POSTHOC, Mode, UnknownModelError, available_models, parse_model
from serving.chat import ChatTemplate, TemplateError
from serving.records import Routed, StreamDelta, TierAnswer, TierRequest
from serving.schema import (AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                            ChatLogProbs, ChatTokenLogProb, CompletionChoice, CompletionRequest, CompletionResponse,
                            ErrorResponse, LogProbs, ModelCard, ModelList, Usage)

log = logging.getLogger("ray.serve")

api = FastAPI(title="moe-ray cascade", version="1", description="OpenAI-compatible completions from a cascade of "
              "a small and a large MoE model, routed by the estimated difficulty of each prompt.")
CHUNK_OBJECT = {"_chunk": "text_completion", "_chat_chunk": "chat.completion.chunk"}  # each API's stream object
HEALTH_TIMEOUT_S = 2.0  # /healthz's ping of each tier
# The error answers of the generation routes, for the OpenAPI document.
ERROR_RESPONSES: dict = {status: {"model": ErrorResponse} for status in (400, 404, 413, 503)}
OTHER_TIER = {"small": "large", "large": "small"}  # who answers when a tier fails


class RequestError(Exception):
    """A request refused before any model sees it."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(status, message, param, error_type)
        self.status, self.message, self.param, self.error_type = status, message, param, error_type


def _error(status: int, message: str, param: Optional[str] = None,
           error_type: str = "invalid_request_error") -> JSONResponse:
    body = ErrorResponse(error={"message": message, "type": error_type, "param": param, "code": None})
    return JSONResponse(status_code=status, content=body.model_dump())


@api.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    return _error(err.status, err.message, err.param, err.error_type)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    elif first.get("type") == "missing":
        message = "field required"
    return _error(400, f"{param}: {message}" if param else message, param)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return _error(err.status_code, str(err.detail))


def _body_limit() -> int:
    """routing.max_body_bytes of the CascadeIngress this replica runs. Read through Serve's replica context, not the
    app's `state`: Serve unpickles its own copy of `api` after the ingress's __init__, so __init__ cannot reach the
    app that serves, and the middleware is a function of this module, outside the ingress."""
    return serve.get_replica_context().servable_object.max_body_bytes


@api.middleware("http")
async def _limit_body(request: Request, call_next):
    declared = request.headers.get("content-length")
    limit = _body_limit()
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            return _error(400, "invalid Content-Length header")
        if too_big:
            return _error(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    return await call_next(request)


class TierFailed(Exception):
    """A tier raised, or did not answer in time."""


@dataclass
class Breaker:
    """A circuit breaker per tier: a tier that just failed is skipped for `cooldown_s`, so its requests degrade
    at once instead of each waiting out the time-out of a tier that is gone (a lost node); after the cooldown
    one request at a time probes it, and the first success closes the breaker again."""

    cooldown_s: float
    open_until: float = 0.0  # 0: closed
    probing: bool = False

    def allow(self) -> bool:
        if self.open_until == 0.0:
            return True
        if time.monotonic() < self.open_until or self.probing:
            return False
        self.probing = True  # half-open: this request probes the tier
        return True

    def failed(self) -> None:
        self.probing = False
        if self.cooldown_s > 0:
            self.open_until = time.monotonic() + self.cooldown_s

    def succeeded(self) -> None:
        self.probing, self.open_until = False, 0.0

    def release(self) -> None:
        """The request ended without telling whether the tier works (a refused request, a cancelled one)."""
        self.probing = False


class CascadeIngress:
    """The ingress deployment class (wrapped with `serve.deployment` and `serve.ingress` in `serving.app`).

    Args:
        small, large: handles to the two `Tier` deployments.
        router_file: router.json of `cascade.calibrate`.
        tokenizer_file: the tiers' common tokenizer.json.
        max_seq_len: the shortest context of the two tiers.
        routing: the `routing` config as a dict.
        cost_ratio: the small tier's cost per token over the large tier's (`routing.cost_ratio`, else their
            active parameters; None for an external large tier without it: budgets are refused).
        chat: the `chat` config as a dict (template, stop); None: the defaults.
    """

    def __init__(self, small: Any, large: Any, router_file: str, tokenizer_file: str, max_seq_len: int,
                 routing: dict[str, Any], cost_ratio: Optional[float] = 1.0,
                 chat: Optional[dict[str, Any]] = None) -> None:
        from ray.serve.metrics import Counter, Histogram
        from tokenizers import Tokenizer

        from moe.difficulty import DifficultyRouter
        from moe.generate import EOS_TOKEN
        from serving.chat import DEFAULT_STOP, DEFAULT_TEMPLATE

        self.tiers = {"small": small, "large": large}
        self.breakers = {name: Breaker(routing.get("breaker_cooldown_s", 0.0)) for name in self.tiers}
        self.router = DifficultyRouter.load(router_file)
        # Checked by serving.app before deployment: a post-hoc threshold from the router or the config.
        self.posthoc_threshold = self.router.posthoc_threshold
        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.tokenizer.encode_special_tokens = True  # as the tiers (moe.generate) and training tokenize
        self.max_seq_len = max_seq_len
        self.routing = routing
        self.cost_ratio = cost_ratio
        self.chat = chat or {"template": DEFAULT_TEMPLATE, "stop": list(DEFAULT_STOP)}
        self.chat_template = ChatTemplate(self.chat["template"], eos_token=EOS_TOKEN)
        self.max_body_bytes = routing["max_body_bytes"]
        self.created = int(time.time())
        self.requests = Counter("moe_serve_requests", description="Completions answered, by tier and mode.",
                                tag_keys=("tier", "mode"))
        self.escalations = Counter("moe_serve_escalations", description="Post-hoc escalations to the large tier.")
        self.degraded = Counter("moe_serve_degraded", description="Answers from a smaller tier after a failure.",
                                tag_keys=("failed_tier",))
        self.tokens = Counter("moe_serve_tokens_generated", description="Completion tokens generated, by tier.",
                              tag_keys=("tier",))
        self.latency = Histogram("moe_serve_latency_seconds", description="Request latency by answering tier.",
                                 boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64], tag_keys=("tier",))

    # ---- the API -------------------------------------------------------------

    @api.get("/healthz", responses={503: {"description": "No tier answers yet (starting) or any more."}})
    async def healthz(self):
        """`ok` when both tiers answer a ping within HEALTH_TIMEOUT_S; `degraded` (still 200: the other tier
        answers for it) naming the one that does not; 503 when neither does: `starting` while Serve still
        starts a tier's replicas (loading its checkpoint), else `unavailable`. `starting` lists the tiers
        whose replicas Serve is still starting. Never waits longer than the ping's time-out."""
        async def answers(tier: str) -> bool:
            response = self.tiers[tier].ping.remote()
            try:
                await asyncio.wait_for(response, HEALTH_TIMEOUT_S)
                return True
            except asyncio.TimeoutError:  # a replica not started yet, or a hanging one: no ping left waiting there
                response.cancel()
                return False
            except Exception:  # a failing or dead replica
                return False

        up = dict(zip(self.tiers, await asyncio.gather(*(answers(tier) for tier in self.tiers))))
        down = [tier for tier, ok in up.items() if not ok]
        if not down:
            return {"status": "ok"}
        starting = await asyncio.to_thread(_starting_deployments, down)
        if len(down) == len(up):
            return JSONResponse(status_code=503, content={"status": "starting" if starting else "unavailable",
                                                          "not_answering": down, "starting": starting})
        return {"status": "degraded", "not_answering": down, "starting": starting}

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=self.created) for name in available_models()])

    @api.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(self, body: CompletionRequest):
        started = time.perf_counter()
        mode = self._mode(body.model)
        self._check_max_tokens(body.max_tokens, "max_tokens")
        if body.max_tokens == 0 and not body.echo:
            raise RequestError(400, "max_tokens: 0 is allowed only with echo (scoring the prompt)", "max_tokens")
        if body.best_of is not None and body.best_of < body.n:
            raise RequestError(400, f"best_of: {body.best_of} is less than n={body.n}", "best_of")
        if body.stream and body.best_of is not None and body.best_of > body.n:
            raise RequestError(400, "best_of: more candidates than n cannot be streamed", "best_of")
        self._check_options(mode, body.stream, body.stream_options, body.logit_bias)
        prompts = body.prompts()
        prompt_ids = [self._prompt_ids(prompt, index if len(prompts) > 1 else None, body.max_tokens)
                      for index, prompt in enumerate(prompts)]
        fields = {**self._tier_fields(body, body.max_tokens, body.stop_strings(), body.logprobs), "echo": body.echo}
        job = Job(mode, prompt_ids, fields, body.n, body.best_of or body.n, body.seed,
                  logprobs=body.logprobs is not None,
                  echo=[p if isinstance(p, str) else self.tokenizer.decode(ids) for p, ids in zip(prompts, prompt_ids)]
                  if body.echo else None)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return StreamingResponse(self._stream(job, meta, started, _include_usage(body), self._chunk),
                                     media_type="text/event-stream")
        results = await self._run(job, started)
        choices = []
        for index, routed in _indexed(results, job.n):
            prompt = index // job.n
            echoed = (prompts[prompt] if isinstance(prompts[prompt], str) else
                      self.tokenizer.decode(job.prompts[prompt])) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._logprobs(routed.answer, job.prompts[prompt] if body.echo else None)
            choices.append(CompletionChoice(text=echoed + routed.answer.text, index=index, logprobs=logprobs,
                                            finish_reason=routed.answer.finish_reason, **routed.routing()))
        return CompletionResponse(**meta, choices=choices, **_summary(job, results))

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(self, body: ChatCompletionRequest):
        started = time.perf_counter()
        mode = self._mode(body.model)
        for name in ("tools", "functions"):
            if getattr(body, name):
                raise RequestError(400, f"{name}: not supported (these tiers call no tools)", name)
        for name in ("tool_choice", "function_call"):
            if getattr(body, name) not in (None, "none"):
                raise RequestError(400, f"{name}: not supported (these tiers call no tools)", name)
        if body.response_format is not None and body.response_format.get("type", "text") != "text":
            raise RequestError(400, f"response_format: only type text is supported, got "
                                    f"{body.response_format.get('type')!r}", "response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise RequestError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise RequestError(400, "max_tokens: give max_completion_tokens or max_tokens, not both", "max_tokens")
        asked = body.max_completion_tokens or body.max_tokens
        key = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        if asked is not None:
            self._check_max_tokens(asked, key)
        self._check_options(mode, body.stream, body.stream_options, body.logit_bias)
        try:
            text = self.chat_template.render([{"role": m.role, "content": m.text(), **({"name": m.name} if m.name
                                               else {})} for m in body.messages])
        except TemplateError as err:
            raise RequestError(400, f"messages: the chat template refused them: {err}", "messages") from None
        prompt_ids = self._prompt_ids(text, None, asked or 1, name="messages")  # room for at least 1 token
        max_tokens = asked or min(self.routing["max_tokens_limit"], self.max_seq_len - len(prompt_ids))
        stop = body.stop_strings() + tuple(s for s in self.chat["stop"] if s not in body.stop_strings())
        job = Job(mode, [prompt_ids], self._tier_fields(body, max_tokens, stop,
                                                        (body.top_logprobs or 0) if body.logprobs else None),
                  body.n, body.n, body.seed, logprobs=body.logprobs)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return StreamingResponse(self._stream(job, meta, started, _include_usage(body), self._chat_chunk),
                                     media_type="text/event-stream")
        results = await self._run(job, started)
        choices = [ChatChoice(index=index, message=AssistantMessage(content=routed.answer.text),
                              finish_reason=routed.answer.finish_reason,
                              logprobs=self._chat_logprobs(routed.answer) if body.logprobs else None,
                              **routed.routing())
                   for index, routed in _indexed(results, job.n)]
        return ChatCompletionResponse(**meta, choices=choices, **_summary(job, results))

    async def _run(self, job: "Job", started: float) -> list[tuple[list[Routed], int]]:
        """Per prompt: its `n` answers and the tokens generated for it (all candidates)."""
        results = await asyncio.gather(*(self._answer_prompt(job, ids) for ids in job.prompts))
        for answers, _ in results:
            for routed in answers:
                self._record(job.mode, routed, started)
        return list(results)

    async def _answer_prompt(self, job: "Job", prompt_ids: list[int]) -> tuple[list[Routed], int]:
        """The `n` answers of one prompt (one routing decision for all) and the tokens generated for it."""
        route = None if job.mode.kind == POSTHOC else await self._choose(job.mode, prompt_ids)
        answers = await asyncio.gather(*(self._answer(job.mode, request, route)
                                         for request in job.candidates(prompt_ids, job.best_of)))
        generated = sum(routed.answer.completion_tokens for routed in answers)
        if len(answers) > job.n:
            answers = sorted(answers, key=lambda routed: routed.answer.mean_logprob, reverse=True)[:job.n]
        return list(answers), generated

    def _tier_fields(self, body: Any, max_tokens: int, stop: tuple[str, ...],
                     top_logprobs: Optional[int]) -> dict[str, Any]:
        """The `TierRequest` fields shared by every prompt and candidate of a job."""
        return {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "stop": tuple(stop),
                "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                "top_logprobs": top_logprobs or 0, "ignore_eos": body.ignore_eos,
                "logit_bias": {int(token): bias for token, bias in (body.logit_bias or {}).items()}}

    def _alternatives(self, positions: list[list[tuple[int, float]]]) -> list[dict[str, float]]:
        """Per position, its most likely (token id, log p) by text; tokens that decode to the same text (a lone
        UTF-8 byte) share one entry, the likelier kept."""
        top = []
        for alternatives in positions:
            entry: dict[str, float] = {}
            for token, logprob in alternatives:  # most likely first; an external tier's are texts already
                entry.setdefault(token if isinstance(token, str) else self.tokenizer.decode([token]), logprob)
            top.append(entry)
        return top

    def _logprobs(self, answer: TierAnswer, echoed: Optional[list[int]] = None) -> LogProbs:
        """The completions API's logprobs: token texts, their log-probabilities, the most likely alternatives;
        with `echoed` (the prompt's ids, echo), the prompt's tokens first, the very first with none."""
        logprobs: list[Optional[float]] = list(answer.token_logprobs)
        top: list[Optional[dict[str, float]]] = self._alternatives(answer.top_logprobs)
        if echoed is not None:
            logprobs = [None] + list(answer.prompt_logprobs or []) + logprobs
            top = [None] + self._alternatives(answer.prompt_top_logprobs or []) + top
        if answer.token_texts is not None:  # an external tier: its own tokens, as texts
            texts = (list(answer.prompt_token_texts or []) if echoed is not None else []) + answer.token_texts
            offsets = list(accumulate((len(text) for text in texts[:-1]), initial=0)) if texts else []
            return LogProbs(tokens=texts, token_logprobs=logprobs, top_logprobs=top, text_offset=offsets)
        ids = (list(echoed) if echoed is not None else []) + answer.token_ids
        return LogProbs(tokens=[self.tokenizer.decode([token]) for token in ids], token_logprobs=logprobs,
                        top_logprobs=top, text_offset=[len(self.tokenizer.decode(ids[:k])) for k in range(len(ids))])

    def _chat_logprobs(self, answer: TierAnswer) -> ChatLogProbs:
        """The chat API's logprobs: per token its text, log-probability, UTF-8 bytes and top alternatives."""
        def item(text: str, logprob: float) -> dict[str, Any]:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = []
        texts = answer.token_texts or [self.tokenizer.decode([token]) for token in answer.token_ids]
        for text, logprob, top in zip(texts, answer.token_logprobs, self._alternatives(answer.top_logprobs)):
            content.append(ChatTokenLogProb(**item(text, logprob),
                                            top_logprobs=[item(t, v) for t, v in top.items()]))
        return ChatLogProbs(content=content)

    # ---- validation ----------------------------------------------------------

    def _mode(self, model: str) -> Mode:
        try:
            return parse_model(model)
        except UnknownModelError as err:
            raise RequestError(404, str(err), "model", "model_not_found") from None

    def _check_max_tokens(self, max_tokens: int, key: str) -> None:
        if max_tokens > self.routing["max_tokens_limit"]:
            raise RequestError(400, f"{key}: {max_tokens} exceeds this server's limit of "
                                    f"{self.routing['max_tokens_limit']}", key)

    def _check_options(self, mode: Mode, stream: bool, stream_options: Any,
                       logit_bias: Optional[dict[str, float]]) -> None:
        """What both APIs check before any tier: streaming options, logit_bias ids, the routing budget."""
        if stream_options is not None and not stream:
            raise RequestError(400, "stream_options: only allowed with stream: true", "stream_options")
        vocab = self.tokenizer.get_vocab_size()
        unknown = sorted(int(token) for token in (logit_bias or {}) if int(token) >= vocab)
        if unknown:
            raise RequestError(400, f"logit_bias: token ids {unknown} are not in the vocabulary of {vocab} tokens",
                               "logit_bias")
        if mode.kind == CASCADE:
            self._threshold(mode)  # a budget below the small tier's cost is refused here, before any tier

    def _prompt_ids(self, prompt: Any, index: Optional[int], max_tokens: int, *, name: str = "prompt") -> list[int]:
        """A prompt (text or token ids) as token ids that fit the context with max_tokens; RequestError if not."""
        label = name if index is None else f"{name}[{index}]"
        vocab = self.tokenizer.get_vocab_size()
        if isinstance(prompt, str):
            if len(prompt) > self.routing["max_prompt_chars"]:
                raise RequestError(400, f"{label}: {len(prompt)} characters exceed the limit of "
                                        f"{self.routing['max_prompt_chars']}", name)
            prompt_ids = self.tokenizer.encode(prompt).ids
        else:
            prompt_ids = list(prompt)
            bad = [token for token in prompt_ids if not 0 <= token < vocab]
            if bad:
                raise RequestError(400, f"{label}: token ids {bad[:8]} are not in the vocabulary of {vocab} "
                                        f"tokens", name)
        if not prompt_ids:
            raise RequestError(400, f"{label}: must not be empty", name)
        if len(prompt_ids) + max_tokens > self.max_seq_len:
            raise RequestError(400, f"{label}: {len(prompt_ids)} prompt tokens + max_tokens {max_tokens} exceed "
                                    f"the models' context of {self.max_seq_len} tokens", name)
        return prompt_ids

    # ---- routing ---------------------------------------------------------------

    def _threshold(self, mode: Mode) -> float:
        if mode.option == "threshold":
            return mode.value
        if mode.option == "fraction":
            return self.router.threshold_for_fraction(mode.value)
        if mode.option == "budget":
            return self._threshold_for_budget(mode.value)
        if self.routing.get("threshold") is not None:
            return self.routing["threshold"]
        if self.routing.get("target_large_fraction") is not None:
            return self.router.threshold_for_fraction(self.routing["target_large_fraction"])
        if self.routing.get("cost_budget") is not None:
            return self._threshold_for_budget(self.routing["cost_budget"])
        return self.router.threshold

    def _threshold_for_budget(self, budget: float) -> float:
        """Budget: mean cost per query as a share of all-large; costs are the tiers' active parameters."""
        from moe.difficulty import large_fraction_for_budget

        if self.cost_ratio is None:
            raise RequestError(400, "model: a budget needs the tiers' cost ratio, which an external large tier does "
                                    "not give: set routing.cost_ratio", "model")
        if budget < self.cost_ratio:
            raise RequestError(400, f"model: budget={budget} is below the small tier's cost "
                                    f"({self.cost_ratio:.3f} of the large tier's): not even all-small fits", "model")
        return self.router.threshold_for_fraction(large_fraction_for_budget(self.cost_ratio, 1.0, budget))

    def _posthoc_decision(self, mode: Mode, answer: TierAnswer) -> tuple[bool, Optional[float]]:
        """(escalate?, the deferral rule's score or None) for the small tier's answer.

        An explicit confidence (the request's or `routing.posthoc_confidence`)
        uses the mean token confidence; otherwise the router's token-level
        deferral rule when it has one, else its calibrated confidence threshold.
        """
        from moe.difficulty import escalate_posthoc

        if mode.option == "confidence":
            return escalate_posthoc(answer.confidence, mode.value), None
        if self.routing.get("posthoc_confidence") is not None and mode.option is None:
            return escalate_posthoc(answer.confidence, self.routing["posthoc_confidence"]), None
        deferral = self.router.deferral
        if deferral is not None:
            score = float(deferral.score([answer.token_logprobs])[0])
            threshold = deferral.threshold_for_fraction(mode.value) if mode.option == "fraction" else \
                deferral.threshold
            return score >= threshold, score
        threshold = (self.router.posthoc_threshold_for_fraction(mode.value) if mode.option == "fraction"
                     else self.posthoc_threshold)
        return escalate_posthoc(answer.confidence, threshold), None

    async def _call(self, tier: str, method: str, *args: Any) -> Any:
        """One call of a tier's method; TierFailed when it fails, times out, or its breaker is open."""
        return await self._guarded(tier, lambda: getattr(self.tiers[tier], method).remote(*args), lambda r: r)

    async def _guarded(self, tier: str, start: Callable[[], Any], first: Callable[[Any], Awaitable[Any]]) -> Any:
        """`first(start())` awaited under the tier's breaker and time-out (`_call`'s answer, a stream's first item).

        Raises:
            TierFailed: the breaker is open, or the tier failed, timed out or refused the request.
            StopAsyncIteration: a stream that ended before any item (the tier works).
        """
        breaker = self.breakers[tier]
        if not breaker.allow():
            raise TierFailed(f"{tier} tier skipped: it failed less than routing.breaker_cooldown_s ago")
        timeout = self.routing["large_timeout_s"] if tier == "large" else None
        response = start()
        try:
            result = await asyncio.wait_for(first(response), timeout)
        except asyncio.TimeoutError:
            response.cancel()
            breaker.failed()
            raise TierFailed(f"{tier} tier timed out after {timeout} s") from None
        except StopAsyncIteration:
            breaker.succeeded()
            raise
        except ValueError as err:  # the tier refused this request (it works): no reason to skip it for others
            response.cancel()
            breaker.release()
            raise TierFailed(f"{tier} tier refused the request: {str(err)[:200]}") from err
        except Exception as err:  # a replica's exception, a dead actor, ...
            response.cancel()
            breaker.failed()
            raise TierFailed(f"{tier} tier failed: {type(err).__name__}: {str(err)[:200]}") from err
        except BaseException:  # cancelled (the client left)
            breaker.release()
            raise
        breaker.succeeded()
        return result

    def _degrade(self, err: TierFailed, fallback: str) -> None:
        """The one place a failed tier is logged and counted before `fallback` answers for it."""
        log.warning("%s; answering with the %s tier", err, fallback)
        self.degraded.inc(tags={"failed_tier": OTHER_TIER[fallback]})

    async def _generate(self, tier: str, request: TierRequest) -> tuple[TierAnswer, str, bool]:
        """(answer, the tier that gave it, degraded?): `tier`'s answer, or when it fails the other tier's.

        Raises:
            RequestError: 503, when neither tier answers.
        """
        try:
            return await self._call(tier, "generate", request), tier, False
        except TierFailed as err:
            fallback = OTHER_TIER[tier]
            self._degrade(err, fallback)
            try:
                return await self._call(fallback, "generate", request), fallback, True
            except TierFailed as second:
                raise RequestError(503, f"no tier could answer: {err}; {second}", None, "server_error") from None

    async def _difficulty(self, prompt_ids: list[int]) -> float:
        import torch

        signals = await self._call("small", "signals", prompt_ids)
        return float(self.router.score(torch.tensor([signals], dtype=torch.float64))[0])

    async def _choose(self, mode: Mode, prompt_ids: list[int]) -> tuple[str, Optional[float]]:
        """(tier, difficulty) before generation; a failed difficulty estimate goes to the large tier."""
        if mode.kind == "tier":
            return mode.tier, None
        try:
            difficulty = await self._difficulty(prompt_ids)
        except TierFailed as err:
            log.warning("difficulty unavailable (%s): routing to the large tier", err)
            return "large", None
        return ("large" if difficulty >= self._threshold(mode) else "small"), difficulty

    async def _answer(self, mode: Mode, request: TierRequest,
                      route: Optional[tuple[str, Optional[float]]] = None) -> Routed:
        """One tier request answered; `route` is the prompt's (tier, difficulty) when already chosen."""
        if mode.kind == POSTHOC:
            return await self._answer_posthoc(mode, request)
        tier, difficulty = route or await self._choose(mode, request.prompt_ids)
        answer, answered_by, degraded = await self._generate(tier, request)
        return Routed(answer, answered_by, difficulty=difficulty, degraded=degraded)

    async def _answer_posthoc(self, mode: Mode, request: TierRequest) -> Routed:
        first, answered_by, degraded = await self._generate("small", request)
        if degraded:  # the large tier answered for a failed small one: nothing left to escalate to
            return Routed(first, answered_by, degraded=True)
        escalate, difficulty = self._posthoc_decision(mode, first)
        if not escalate:
            return Routed(first, "small", difficulty=difficulty)
        self.escalations.inc()
        try:
            answer = await self._call("large", "generate", request)
        except TierFailed as err:  # post-hoc keeps the small answer it already has
            self._degrade(err, "small")
            return Routed(first, "small", difficulty=difficulty, degraded=True, escalated=True)
        return Routed(answer, "large", difficulty=difficulty, escalated=True, confidence=first.confidence)

    def _record(self, mode: Mode, routed: Routed, started: float) -> None:
        tier = routed.tier
        self.requests.inc(tags={"tier": tier, "mode": mode.kind})
        # A stop string can end a completion before its first token, and Ray's counters refuse an increment of 0.
        if routed.answer.completion_tokens:
            self.tokens.inc(routed.answer.completion_tokens, tags={"tier": tier})
        self.latency.observe(time.perf_counter() - started, tags={"tier": tier})

    # ---- streaming -------------------------------------------------------------

    async def _stream(self, job: "Job", meta: dict[str, Any], started: float, include_usage: bool,
                      chunk: Any) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's format (`chunk` formats one); the routing fields ride on every
        chunk. The choices of a batch stream one after the other, each chunk naming its choice's `index`."""
        generated = 0
        try:
            for i, prompt_ids in enumerate(job.prompts):
                route = None if job.mode.kind == POSTHOC else await self._choose(job.mode, prompt_ids)
                for j, request in enumerate(job.candidates(prompt_ids, job.n)):
                    index, first = i * job.n + j, True
                    if job.logprobs or job.echo is not None:
                        # Log-probabilities (and an echoed prompt) come with the whole answer: one chunk per
                        # choice carries its text and logprobs, as a client concatenating chunks expects.
                        routed = await self._answer(job.mode, request, route)
                        yield self._whole_chunk(chunk, meta, job, i, index, routed)
                        generated += routed.answer.completion_tokens
                        self._record(job.mode, routed, started)
                        continue
                    async for routing, text, done in self._stream_one(job.mode, request, route):
                        yield chunk(meta, routing, text, done.answer.finish_reason if done else None, index, first)
                        first = False
                        if done is not None:
                            generated += done.answer.completion_tokens
                            self._record(job.mode, done, started)
        except RequestError as err:
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.error_type}})}\n\n"
        if include_usage:
            prompt_tokens = sum(len(ids) for ids in job.prompts)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                     "total_tokens": prompt_tokens + generated}
            last = {**meta, "object": CHUNK_OBJECT[chunk.__name__], "choices": [], "usage": usage}
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"

    async def _stream_one(self, mode: Mode, request: TierRequest, route: Optional[tuple[str, Optional[float]]]):
        """Yields (routing, text delta, None) and last (routing, "", the routed answer) for one choice."""
        if mode.kind == POSTHOC:  # the decision needs the whole small answer: send it as one chunk
            routed = await self._answer_posthoc(mode, request)
            routing = {"routed_to": routed.tier, "escalated": routed.escalated, "degraded": routed.degraded}
            yield routing, routed.answer.text, None
            yield routing, "", routed
            return
        tier, difficulty = route
        routing = {"routed_to": tier, "difficulty": difficulty, "escalated": False, "degraded": False}
        async for item, routing in self._stream_tier(tier, request, routing):
            if isinstance(item, StreamDelta):
                yield routing, item.text, None
            else:
                yield routing, "", Routed(item, routing["routed_to"], difficulty=difficulty,
                                          degraded=routing["degraded"])

    async def _stream_tier(self, tier: str, request: TierRequest, routing: dict[str, Any]):
        """Yields (StreamDelta, routing)s, then (TierAnswer, routing); degrades before the first token."""
        streams: list[Any] = []

        def start() -> Any:
            streams.append(self.tiers[tier].options(stream=True).stream.remote(request))
            return streams[-1]

        try:
            first = await self._guarded(tier, start, lambda stream: stream.__anext__())
        except StopAsyncIteration:
            return
        except TierFailed as err:  # failure or time-out before any token: the other tier answers
            if routing.get("degraded"):
                raise RequestError(503, f"no tier could answer: {err}", None, "server_error") from None
            fallback = OTHER_TIER[tier]
            self._degrade(err, fallback)
            async for item in self._stream_tier(fallback, request,
                                                {**routing, "routed_to": fallback, "degraded": True}):
                yield item
            return
        generator = streams[0]
        item = first
        while True:
            yield item, routing
            if isinstance(item, TierAnswer):
                return
            try:
                item = await generator.__anext__()
            except StopAsyncIteration:
                return

    def _whole_chunk(self, chunk: Any, meta: dict[str, Any], job: "Job", prompt: int, index: int,
                     routed: Routed) -> str:
        """One choice answered whole, as a single chunk of its API with the echoed prompt and logprobs."""
        answer = routed.answer
        if chunk.__name__ == "_chunk":
            echo = job.echo[prompt] if job.echo is not None else ""
            logprobs = (self._logprobs(answer, job.prompts[prompt] if job.echo is not None else None).model_dump()
                        if job.logprobs else None)
            return chunk(meta, routed.routing(), echo + answer.text, answer.finish_reason, index, True, logprobs)
        logprobs = self._chat_logprobs(answer).model_dump() if job.logprobs else None
        return chunk(meta, routed.routing(), answer.text, answer.finish_reason, index, True, logprobs)

    @staticmethod
    def _chunk(meta: dict[str, Any], routing: dict[str, Any], text: str, finish_reason: Optional[str],
               index: int = 0, first: bool = False, logprobs: Optional[dict[str, Any]] = None) -> str:
        chunk = {**meta, "object": CHUNK_OBJECT["_chunk"],
                 "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}],
                 **routing}
        return f"data: {json.dumps(chunk)}\n\n"

    @staticmethod
    def _chat_chunk(meta: dict[str, Any], routing: dict[str, Any], text: str, finish_reason: Optional[str],
                    index: int = 0, first: bool = False, logprobs: Optional[dict[str, Any]] = None) -> str:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        chunk = {**meta, "object": CHUNK_OBJECT["_chat_chunk"],
                 "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
                 **routing}
        return f"data: {json.dumps(chunk)}\n\n"


@dataclass
class Job:
    """One API request as the tiers see it: its prompts as token ids, and the fields of every tier request."""

    mode: Mode
    prompts: list[list[int]]
    fields: dict[str, Any]  # the TierRequest fields every prompt and candidate share
    n: int
    best_of: int
    seed: Optional[int]
    logprobs: bool = False  # the client asked for log-probabilities
    echo: Optional[list[str]] = None  # the completions API's echo: each prompt's text, returned before its answer

    def candidates(self, prompt_ids: list[int], count: int) -> list[TierRequest]:
        """The tier requests of one prompt: `count` of them, seeds seed, seed + 1, ... when a seed is given."""
        return [TierRequest(prompt_ids=prompt_ids, seed=None if self.seed is None else (self.seed + k) % 2 ** 63,
                            **self.fields) for k in range(count)]


def _starting_deployments(names: list[str]) -> list[str]:
    """Which of this application's deployments Serve is still starting (status UPDATING, no replica running)."""
    from ray.serve.schema import DeploymentStatus

    try:
        app = serve.status().applications[serve.get_replica_context().app_name]
    except Exception:  # the controller is unreachable: nothing known to be starting
        return []
    return [name for name in names
            if name in app.deployments and app.deployments[name].status == DeploymentStatus.UPDATING
            and not app.deployments[name].replica_states.get("RUNNING")]


def _include_usage(body: Any) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _indexed(results: list[tuple[list[Routed], int]], n: int) -> list[tuple[int, Routed]]:
    """(choice index, answer): prompt i's k-th answer is choice i * n + k, as OpenAI numbers them."""
    return [(i * n + k, answer) for i, (answers, _) in enumerate(results) for k, answer in enumerate(answers)]


def _summary(job: Job, results: list[tuple[list[Routed], int]]) -> dict[str, Any]:
    """The response's usage (prompts counted once, every generated candidate counted) and routing fields."""
    answers = [answer for answers, _ in results for answer in answers]
    prompt_tokens = sum(len(ids) for ids in job.prompts)
    generated = sum(tokens for _, tokens in results)
    tiers = {routed.tier for routed in answers}
    return {"usage": Usage(prompt_tokens=prompt_tokens, completion_tokens=generated,
                           total_tokens=prompt_tokens + generated),
            "routed_to": tiers.pop() if len(tiers) == 1 else "mixed", "difficulty": answers[0].difficulty,
            "escalated": any(routed.escalated for routed in answers),
            "degraded": any(routed.degraded for routed in answers),
            "confidence": answers[0].confidence if answers[0].confidence is not None else answers[0].answer.confidence}


# The FastAPI routes of the class become bound to the replica here, once per process:
# `serve.ingress` rewrites the app's routes, so it must not run again for each application built.
IngressDeployment = serve.ingress(api)(CascadeIngress)
