"""Calibration labels from an OpenAI-compatible endpoint: the large tier's continuation NLL, read from `echo`.

`python -m cascade.calibrate small=CKPT large_endpoint=http://HOST:PORT/v1 large_model=NAME` scores each
calibration query's true continuation under the endpoint's model instead of a local checkpoint, so the router
of a cascade with an external large tier (`tiers.large.endpoint`) is fitted on that tier's own quality.

NOTE: scoring a continuation through a text API.
1. A query's prompt and continuation ids are decoded with the cascade's tokenizer, as the serving tier does
   (`serving.endpoint`): prompt text P and full text T = decode(prompt + continuation), P a prefix of T.
2. T is posted with `echo: true, logprobs: 0, max_tokens: 1, temperature: 0` (lm-evaluation-harness's
   loglikelihood request, which vLLM, Ray Serve LLM and moe.serve answer): the endpoint returns its own tokens of
   T with their log-probabilities and `text_offset`s, then the one generated token, which is dropped.
3. The endpoint's tokens cannot be matched one for one with the cascade's, so quality is counted per
   character: the NLL of the endpoint's tokens that reach past P (a token straddling the boundary counts whole),
   over the characters from the first such token's start to the end of T. The small tier's NLL is counted over
   its own continuation tokens, over the continuation's characters (len(T) - len(P)). Both tiers are then in
   nats per character and their difference is the label's gain.
4. A query whose continuation decodes to no text (an end-of-text token only), or whose echoed tokens do not
   spell T (offsets that do not add up), cannot be scored this way and is left out; the report counts them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Optional

RETRY_BACKOFF_S = 0.2  # the first retry's wait; each later one waits twice as long


@dataclass
class ScoredText:
    """One text's continuation under the endpoint: its NLL (nats) and the characters it covers; None if unscorable."""
    nll: Optional[float]
    num_chars: int


class EndpointScorer:
    """Scores continuations under an OpenAI-compatible completions endpoint (NOTE 2-3).

    Args:
        endpoint: the API's base URL, ending in /v1.
        model: the model name the endpoint serves.
        timeout_s: one HTTP request's time-out.
        api_key_env: the environment variable holding the API key (a bearer token), or None.
        max_retries: retries of a request that could not connect (doubling back-off from 0.2 s).
        batch_size: texts per request (the completions API takes a list of prompts).
    Raises:
        ValueError: an unset API-key variable (named as `large_api_key_env`).
    """

    def __init__(self, endpoint: str, model: str, *, timeout_s: float = 60.0, api_key_env: Optional[str] = None,
                 max_retries: int = 2, batch_size: int = 8) -> None:
        import httpx

        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.batch_size = batch_size
        headers = {}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"large_api_key_env: the environment variable {api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s))

    def check(self) -> None:
        """The endpoint answers `/models` and lists `model`.

        Raises:
            ValueError: naming `large_endpoint` (unreachable, an HTTP error) or `large_model` (not served).
        """
        response = self._request("GET", f"{self.endpoint}/models")
        try:
            names = [card.get("id") for card in response.json()["data"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"large_endpoint: {self.endpoint}/models did not answer an OpenAI model list") from None
        if self.model not in names:
            raise ValueError(f"large_model: {self.endpoint} does not serve {self.model!r} (it serves {names})")

    def score(self, texts: list[tuple[str, str]]) -> list[ScoredText]:
        """Per (prompt text P, full text T): the NLL of T's continuation past P under the model (NOTE 3).

        Raises:
            ValueError: naming `large_endpoint`: a failed request or an answer that is not an echoed completion.
        """
        scored: list[ScoredText] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            body = {"model": self.model, "prompt": [full for _, full in chunk], "max_tokens": 1, "temperature": 0,
                    "echo": True, "logprobs": 0}
            answer = self._request("POST", f"{self.endpoint}/completions", json=body).json()
            try:
                choices = sorted(answer["choices"], key=lambda choice: choice["index"])
                if len(choices) != len(chunk):
                    raise ValueError(f"{len(choices)} choices for {len(chunk)} prompts")
                scored += [_continuation(choice["logprobs"], prompt, full)
                           for choice, (prompt, full) in zip(choices, chunk)]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"large_endpoint: {self.endpoint}/completions did not answer an echoed completion "
                                 f"with logprobs ({type(err).__name__}: {err})") from None
        return scored

    def _request(self, method: str, url: str, **kwargs: Any):
        import httpx

        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.request(method, url, **kwargs)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                if attempt == self.max_retries:
                    raise ValueError(f"large_endpoint: {url}: {type(err).__name__} after {attempt + 1} attempts "
                                     f"(is the endpoint up?)") from None
                time.sleep(RETRY_BACKOFF_S * 2 ** attempt)
            except httpx.HTTPError as err:
                raise ValueError(f"large_endpoint: {url}: {type(err).__name__}: {err}") from None
        if response.status_code != 200:
            raise ValueError(f"large_endpoint: {url}: HTTP {response.status_code}: {response.text[:300]}")
        return response


def _continuation(logprobs: dict[str, Any], prompt: str, full: str) -> ScoredText:
    """NOTE 3 on one echoed answer: the endpoint's tokens of `full` that reach past `prompt`."""
    tokens, token_logprobs = logprobs["tokens"], logprobs["token_logprobs"]
    offsets = logprobs.get("text_offset")
    if offsets is None:  # a server without offsets: the tokens' texts laid end to end
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
    ends = [offset + len(token) for offset, token in zip(offsets, tokens)]
    in_text = [i for i, offset in enumerate(offsets) if offset < len(full)]  # the generated token starts at len(full)
    if not in_text or ends[in_text[-1]] != len(full) or offsets[in_text[0]] != 0:
        return ScoredText(nll=None, num_chars=0)  # the echoed tokens do not spell the text (NOTE 4)
    past_prompt = [i for i in in_text if ends[i] > len(prompt) and token_logprobs[i] is not None]
    if not past_prompt:
        return ScoredText(nll=None, num_chars=0)
    return ScoredText(nll=-sum(float(token_logprobs[i]) for i in past_prompt),
                      num_chars=len(full) - offsets[past_prompt[0]])
