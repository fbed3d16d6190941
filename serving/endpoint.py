"""An external tier: any OpenAI-compatible completions endpoint (vLLM, Ray Serve LLM, a hosted API, another moe.serve).

`tiers.large.endpoint=http://HOST:PORT/v1 tiers.large.model=NAME` puts this
deployment where the large `Tier` would be. It answers the same calls as a
`Tier` (`ping`, `info`, `generate`, `stream`, `calls`) with the same answer
records, so the ingress routes to it, falls back from it and times it out as
it does a checkpoint tier. What it cannot give:

- router signals: the cascade scores prompts with the small tier's own prefill,
  so only the large tier may be external;
- token ids: the endpoint has its own tokenizer. The ingress's prompt ids are
  decoded with the cascade's tokenizer and sent as text; the answer's tokens and
  log-probabilities are the endpoint's own (`token_texts`), and `logit_bias`
  (ids of the cascade's vocabulary) is refused, so such a request is answered
  by the small tier with `degraded: true`.

NOTE: failures. Connection errors (the endpoint is down or not yet up; the
request never reached it) are retried `max_retries` times with doubling
back-off; anything else (an HTTP error status, a read time-out, a malformed
answer) raises at once. Either way the ingress answers from the small tier
with `degraded: true`: a client of the cascade sees no 5xx while the small
tier answers.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from typing import Any, AsyncIterator, Optional

from serving.records import StreamDelta, TierAnswer, TierRequest

RETRY_BACKOFF_S = 0.2  # the first retry's wait; each later one waits twice as long
PING_TIMEOUT_S = 5.0


class EndpointError(RuntimeError):
    """The endpoint refused the request, failed, or answered something that is not an OpenAI completion."""


def _positions(logprobs: Optional[dict[str, Any]]) -> tuple[list[str], list[Optional[float]], list[list]]:
    """(token texts, their log-probabilities, per token its alternatives as (text, log p), likeliest first)."""
    if logprobs is None:
        return [], [], []
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    alternatives = [sorted((top or {}).items(), key=lambda item: -item[1]) for top in tops]
    return list(logprobs["tokens"]), list(logprobs["token_logprobs"]), alternatives


class EndpointTier:
    """A Ray Serve deployment class (wrapped with `serve.deployment` in `serving.app`).

    Args:
        name: the tier's name (`large`).
        endpoint: the API's base URL, ending in /v1 (`{endpoint}/completions` is posted to).
        model: the model name the endpoint serves.
        tokenizer_file: the cascade's tokenizer.json (prompt ids are decoded with it).
        timeout_s: one HTTP request's time-out.
        api_key_env: the environment variable holding the API key (sent as a bearer token), or None.
        max_retries: retries of a request that could not connect.
    """

    def __init__(self, name: str, endpoint: str, model: str, tokenizer_file: str, timeout_s: float = 60.0,
                 api_key_env: Optional[str] = None, max_retries: int = 2) -> None:
        import httpx
        from tokenizers import Tokenizer

        self.name = name
        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        self.max_retries = max_retries
        headers = {}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"tiers.{name}.api_key_env: the environment variable {api_key_env} is not set in "
                                 f"this replica's environment")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s))
        self.num_calls = 0
        self.num_retries = 0

    def calls(self) -> int:
        return self.num_calls

    def retries(self) -> int:
        """Connection retries so far (tests check that a dead endpoint is retried, then given up)."""
        return self.num_retries

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "endpoint": self.endpoint, "model": self.model}

    async def ping(self) -> bool:
        """The ingress's /healthz: the endpoint lists its models, ours among them."""
        import httpx

        try:
            response = await self.client.get(f"{self.endpoint}/models", timeout=PING_TIMEOUT_S)
        except httpx.HTTPError as err:
            raise EndpointError(f"{self.endpoint}: {type(err).__name__}") from None
        if response.status_code != 200:
            raise EndpointError(f"{self.endpoint}/models: HTTP {response.status_code}")
        names = [card.get("id") for card in response.json().get("data", [])]
        if self.model not in names:
            raise EndpointError(f"{self.endpoint} does not serve {self.model!r} (it serves {names})")
        return True

    def _body(self, request: TierRequest, stream: bool) -> dict[str, Any]:
        if request.logit_bias:  # a refusal of this request (ValueError), not a failure of the endpoint
            raise ValueError("logit_bias: token ids of the cascade's vocabulary mean nothing to an external tier")
        body = {"model": self.model, "prompt": self.tokenizer.decode(request.prompt_ids),
                "max_tokens": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p,
                "presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty}
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        if request.ignore_eos:  # vLLM's extension; sent only when asked, as other APIs refuse it
            body["ignore_eos"] = True
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        else:  # the answer's token log-probabilities (best_of ranks by them; logprobs and echo return them)
            body["logprobs"] = request.top_logprobs
            if request.echo:
                body["echo"] = True
        return body

    async def _post(self, body: dict[str, Any], stream: bool = False):
        """POSTs to /completions; retries what could not connect. Returns the response (open when streaming)."""
        import httpx

        url = f"{self.endpoint}/completions"
        for attempt in range(self.max_retries + 1):
            try:
                if stream:
                    response = await self.client.send(self.client.build_request("POST", url, json=body), stream=True)
                else:
                    response = await self.client.post(url, json=body)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                if attempt == self.max_retries:
                    raise EndpointError(f"{url}: {type(err).__name__} after {attempt + 1} attempts") from None
                self.num_retries += 1
                await asyncio.sleep(RETRY_BACKOFF_S * 2 ** attempt)
            except httpx.HTTPError as err:  # a read time-out, a reset connection: the request may have run
                raise EndpointError(f"{url}: {type(err).__name__}: {err}") from None
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:300]
            await response.aclose()
            raise EndpointError(f"{url}: HTTP {response.status_code}: {detail}")
        return response

    async def generate(self, request: TierRequest) -> TierAnswer:
        """One completion, as `Tier.generate` answers it; token texts and log-probabilities are the endpoint's."""
        self.num_calls += 1
        started = time.perf_counter()
        answer = (await self._post(self._body(request, stream=False))).json()
        try:
            (choice,) = answer["choices"]
            usage = answer["usage"]
            texts, logprobs, top = _positions(choice.get("logprobs"))
        except (KeyError, TypeError, ValueError) as err:
            raise EndpointError(f"{self.endpoint}: not an OpenAI completion ({type(err).__name__}: {err})") from None
        text = choice["text"]
        echoed: dict[str, Any] = {}
        if request.echo:  # the prompt's tokens come first, then the answer's
            prompt = self.tokenizer.decode(request.prompt_ids)
            if not text.startswith(prompt):
                raise EndpointError(f"{self.endpoint}: echo did not return the prompt")
            text = text[len(prompt):]
            split = len(texts) - usage["completion_tokens"]
            echoed = {"prompt_token_texts": texts[:split], "prompt_logprobs": logprobs[1:split],
                      "prompt_top_logprobs": top[1:split]}
            texts, logprobs, top = texts[split:], logprobs[split:], top[split:]
        if usage["completion_tokens"] and not logprobs:
            raise EndpointError(f"{self.endpoint}: the answer carries no token log-probabilities")
        confidence = math.exp(sum(logprobs) / len(logprobs)) if logprobs else 1.0
        return TierAnswer(text=text, finish_reason=choice.get("finish_reason") or "stop",
                          prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
                          confidence=confidence, token_logprobs=logprobs, top_logprobs=top, token_texts=texts,
                          latency_s=time.perf_counter() - started, **echoed)

    async def stream(self, request: TierRequest) -> AsyncIterator[Any]:
        """Yields a `StreamDelta` as the endpoint streams, then the `TierAnswer`, as `Tier.stream` does."""
        self.num_calls += 1
        response = await self._post(self._body(request, stream=True), stream=True)
        text, finish_reason, usage = [], None, None
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise EndpointError(f"{self.endpoint}: {chunk['error']}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    finish_reason = choice.get("finish_reason") or finish_reason
                    if choice.get("text"):
                        text.append(choice["text"])
                        yield StreamDelta(choice["text"])
        finally:
            await response.aclose()
        whole = "".join(text)
        completion_tokens = usage["completion_tokens"] if usage else len(self.tokenizer.encode(whole).ids)
        prompt_tokens = usage["prompt_tokens"] if usage else len(request.prompt_ids)
        yield TierAnswer(text=whole, finish_reason=finish_reason or "stop", prompt_tokens=prompt_tokens,
                         completion_tokens=completion_tokens, confidence=1.0, token_texts=[])
