"""The cascade on a real Ray Serve: real HTTP requests (requests, the `openai` client, schemathesis).

Three applications run on one local Ray and Serve: the cascade of two tiny
random-weight tiers, and two copies whose large tier is configured to fail
(`fault=error`) or never answer (`fault=hang`), to drill the degraded path;
a fourth comes and goes, deployed from infra/serve_config.yaml.
The tiers are real `Tier` deployments over real checkpoints; the router is a
`moe.difficulty.DifficultyRouter` whose only weight is on the prompt length,
so the expected tier of every prompt is known.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

from hydra import compose, initialize_config_dir  # noqa: E402

import moe  # noqa: E402
from moe.difficulty import SIGNAL_NAMES, DifficultyRouter, prompt_signals  # noqa: E402
from moe.generate import Generator, SamplingParams, load_tokenizer  # noqa: E402
from serving.app import build_app, check_tiers, tier_facts  # noqa: E402
from serving.config import register_configs  # noqa: E402
from serving_helpers import LENGTH_SPLIT, LONG, SHORT, TcpForwarder, make_tiers, serve_config_app  # noqa: E402
from train_helpers import ROOT, prometheus_lines  # noqa: E402

pytestmark = pytest.mark.slow
register_configs()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cfg(small: Path, large: Path, router: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="serve", overrides=[
            f"small={small}", f"large={large}", f"routing.router={router}", "routing.max_tokens_limit=8",
            "routing.max_prompt_chars=2000", "routing.max_body_bytes=20000", "tiers.small.num_cpus=0.5",
            "tiers.large.num_cpus=0.5", "tiers.small.max_batch_size=4", "tiers.large.max_batch_size=4",
            *overrides])


@pytest.fixture(scope="module")
def tiers(tmp_path_factory) -> dict[str, Path]:
    return make_tiers(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def forwarder(server):
    """The address of the `external` app's large tier: a TCP forwarder to the `cascade` app's port."""
    return server.forwarder


@pytest.fixture(scope="module")
def server(tiers, ray_cluster):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    forwarder = TcpForwarder(port).start()
    apps = {"cascade": ("/", []), "broken": ("/broken", ["tiers.large.fault=error"]),
            "hanging": ("/hanging", ["tiers.large.fault=hang", "routing.large_timeout_s=1"]),
            # The large tier an external OpenAI-compatible endpoint: the cascade app's own large tier, reached
            # over HTTP through the forwarder (which a test shuts to lose the endpoint).
            "external": ("/external", ["large=null", f"tiers.large.endpoint=http://127.0.0.1:{forwarder.port}/v1",
                                       "tiers.large.model=large", "tiers.large.num_cpus=0.1",
                                       "tiers.small.num_cpus=0.1",  # 3.6 of the session's 4 CPUs in all
                                       "tiers.large.max_retries=1", "routing.breaker_cooldown_s=1"])}
    for name, (prefix, overrides) in apps.items():
        cfg = serve_cfg(tiers["small"], tiers["large"], tiers["router"], *overrides)
        facts = tier_facts(cfg)
        serve.run(build_app(cfg, facts, tiers["router"]), name=name, route_prefix=prefix)
    url = URL(f"http://127.0.0.1:{port}")
    url.forwarder = forwarder
    yield url
    forwarder.close()
    serve.shutdown()


class URL(str):
    """The server's address, carrying the external app's forwarder."""


@pytest.fixture(scope="module")
def local(tiers) -> dict[str, Generator]:
    """The same checkpoints run in this process, as the reference for the served answers."""
    return {name: Generator(moe.load_checkpoint(tiers[name]).eval(), load_tokenizer(tiers[name]))
            for name in ("small", "large")}


def complete(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json=body, timeout=60)


def tier_calls(app: str = "cascade") -> dict[str, int]:
    return {name: serve.get_deployment_handle(name, app_name=app).calls.remote().result()
            for name in ("small", "large")}


def test_health_and_models(server) -> None:
    assert requests.get(f"{server}/healthz", timeout=10).json() == {"status": "ok"}
    # A failing or hanging large tier: degraded, still 200 (the small tier answers for it), within the ping's
    # time-out. A cascade whose tiers both fail: 503, never a hang.
    for prefix in ("/broken", "/hanging"):
        started = time.monotonic()
        response = requests.get(f"{server}{prefix}/healthz", timeout=10)
        assert response.status_code == 200 and response.json() == {"status": "degraded", "not_answering": ["large"],
                                                                   "starting": []}
        assert time.monotonic() - started < 5
    ids = [m["id"] for m in requests.get(f"{server}/v1/models", timeout=10).json()["data"]]
    assert {"cascade", "cascade-posthoc", "small", "large"} <= set(ids)


def test_tiers_answer_as_the_checkpoints_do(server, local) -> None:
    # ignore_eos (vLLM's extension, sent by load tools): an EOS forced by logit_bias no longer ends the answer.
    eos = str(local["small"].eos_id)
    for ignore_eos, tokens in ((False, 0), (True, 5)):
        body = complete(server, model="small", prompt=SHORT, max_tokens=5, logit_bias={eos: 100},
                        ignore_eos=ignore_eos).json()
        assert body["usage"]["completion_tokens"] == tokens, body
    for tier in ("small", "large"):
        body = complete(server, model=tier, prompt=SHORT, max_tokens=6, temperature=0).json()
        expected = local[tier].generate([SHORT], [SamplingParams(max_tokens=6)])[0]
        assert body["choices"][0]["text"] == expected.text
        assert body["routed_to"] == tier and not body["degraded"] and not body["escalated"]
        assert body["usage"]["completion_tokens"] == len(expected.token_ids)
        assert body["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)


def test_cascade_routes_by_difficulty(server, local, tiers) -> None:
    router = DifficultyRouter.load(tiers["router"])
    for prompt, tier in ((SHORT, "small"), (LONG, "large")):
        ids = local["small"].encode(prompt)
        assert (len(ids) > LENGTH_SPLIT) == (tier == "large")
        body = complete(server, prompt=prompt, max_tokens=4, temperature=0).json()  # model defaults to cascade
        assert body["routed_to"] == tier
        features = prompt_signals(local["small"].model, [ids], hidden=router.hidden)
        expected = float(router.score(features)[0])
        assert body["difficulty"] == pytest.approx(expected, abs=1e-6)
        if tier == "small":  # the probe's hidden-state term reached the score (unsaturated for the short prompt)
            logit = router.bias + features[0, SIGNAL_NAMES.index("prompt_tokens")].item()
            assert abs(body["difficulty"] * (1 + math.exp(-logit)) - 1) > 1e-3
        assert body["choices"][0]["text"] == local[tier].generate([prompt], [SamplingParams(max_tokens=4)])[0].text
    # Explicit thresholds and target fractions in the model name.
    assert complete(server, model="cascade@threshold=0", prompt=SHORT, max_tokens=2).json()["routed_to"] == "large"
    assert complete(server, model="cascade@threshold=1", prompt=LONG, max_tokens=2).json()["routed_to"] == "small"
    assert complete(server, model="cascade@fraction=1", prompt=SHORT, max_tokens=2).json()["routed_to"] == "large"
    assert complete(server, model="cascade@fraction=0", prompt=LONG, max_tokens=2).json()["routed_to"] == "small"
    # A cost budget, as a share of the all-large cost (costs: the tiers' active parameters).
    assert complete(server, model="cascade@budget=1", prompt=SHORT, max_tokens=2).json()["routed_to"] == "large"
    facts = check_tiers(str(tiers["small"]), str(tiers["large"]))
    ratio = facts["small"]["active_params"] / facts["large"]["active_params"]
    assert complete(server, model=f"cascade@budget={ratio!r}", prompt=LONG,
                    max_tokens=2).json()["routed_to"] == "small"


def test_posthoc_escalates_on_low_confidence(server, local) -> None:
    confidence = local["small"].generate([SHORT], [SamplingParams(max_tokens=4)])[0].mean_confidence
    body = complete(server, model="cascade-posthoc@confidence=1", prompt=SHORT, max_tokens=4, temperature=0).json()
    assert body["routed_to"] == "large" and body["escalated"] and body["confidence"] == pytest.approx(confidence)
    body = complete(server, model="cascade-posthoc@confidence=0", prompt=SHORT, max_tokens=4, temperature=0).json()
    assert body["routed_to"] == "small" and not body["escalated"]


def test_posthoc_defers_on_the_token_level_rule(server, local, tiers) -> None:
    """Without a confidence, cascade-posthoc escalates on the router's deferral rule over the answer's tokens."""
    rule = DifficultyRouter.load(tiers["router"]).deferral
    answer = local["small"].generate([SHORT], [SamplingParams(max_tokens=4)])[0]
    score = float(rule.score([answer.token_logprobs])[0])
    for model, tier in (("cascade-posthoc@fraction=1", "large"), ("cascade-posthoc@fraction=0", "small"),
                        ("cascade-posthoc", "large" if score >= rule.threshold else "small")):
        body = complete(server, model=model, prompt=SHORT, max_tokens=4, temperature=0).json()
        assert body["routed_to"] == tier and body["escalated"] == (tier == "large"), model
        assert body["difficulty"] == pytest.approx(score, abs=1e-9)


def test_openai_client_plain_and_streamed(server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    plain = client.completions.create(model="cascade", prompt=LONG, max_tokens=6, temperature=0)
    assert plain.model_extra["routed_to"] == "large"
    chunks = list(client.completions.create(model="cascade", prompt=LONG, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.model_extra["routed_to"] == "large" for c in chunks)
    # Sampling with a seed is reproducible through the whole stack.
    a, b = (client.completions.create(model="small", prompt=SHORT, max_tokens=8, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    # Batches, n and logprobs through the SDK's own types.
    batch = client.completions.create(model="small", prompt=[SHORT, SHORT], max_tokens=3, temperature=0, n=2,
                                      logprobs=1)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3] and len({c.text for c in batch.choices}) == 1
    assert all(len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) == len(c.logprobs.top_logprobs)
               for c in batch.choices)
    # Chat, plain and streamed.
    messages = [{"role": "user", "content": SHORT}]
    plain = client.chat.completions.create(model="small", messages=messages, max_tokens=4, temperature=0,
                                           logprobs=True, top_logprobs=1)
    assert plain.choices[0].message.role == "assistant" and plain.model_extra["routed_to"] == "small"
    assert len(plain.choices[0].logprobs.content) == plain.usage.completion_tokens
    streamed = client.chat.completions.create(model="small", messages=messages, max_tokens=4, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == plain.choices[0].message.content


def test_concurrent_streams_decode_together_and_equal_plain_answers(server) -> None:
    """Streams that overlap share the tier's live batch (LiveBatch): each still equals its plain answer."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [(SHORT, 8), (LONG[:40], 5), ("a mixture of experts", 7), ("grouped matrix", 3)] * 2

    def streamed(prompt: str, max_tokens: int) -> str:
        text = requests.post(f"{server}/v1/completions", json={"model": "small", "prompt": prompt, "max_tokens":
                             max_tokens, "temperature": 0, "stream": True}, timeout=60).text
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        return "".join(e["choices"][0]["text"] for e in events)

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(lambda args: streamed(*args), prompts))
    for (prompt, max_tokens), text in zip(prompts, texts):
        plain = complete(server, model="small", prompt=prompt, max_tokens=max_tokens, temperature=0).json()
        assert text == plain["choices"][0]["text"], (prompt, text, plain)


def test_request_shapes_of_common_clients(server, local) -> None:
    """What LangChain, lm-evaluation-harness and the openai SDK send: prompt lists and token ids, n and best_of,
    logprobs, penalties and logit_bias, stream_options; each checked against the checkpoints run locally."""
    def local_completion(tier: str, prompt: str, **params):
        return local[tier].generate([prompt], [SamplingParams(max_tokens=4, **params)])[0]

    # A batch of prompts (text, or token ids): each routed on its own, one choice each, usage summed.
    short_ids, long_ids = local["small"].encode(SHORT), local["small"].encode(LONG)
    for prompt in ([SHORT, LONG], [short_ids, long_ids]):
        body = complete(server, prompt=prompt, max_tokens=4, temperature=0).json()
        assert [c["index"] for c in body["choices"]] == [0, 1]
        assert [c["routed_to"] for c in body["choices"]] == ["small", "large"] and body["routed_to"] == "mixed"
        assert [c["text"] for c in body["choices"]] == [local_completion("small", SHORT).text,
                                                        local_completion("large", LONG).text]
        assert body["usage"]["prompt_tokens"] == len(short_ids) + len(long_ids)
        assert body["usage"]["completion_tokens"] == (len(local_completion("small", SHORT).token_ids)
                                                      + len(local_completion("large", LONG).token_ids))
    assert complete(server, prompt=short_ids, max_tokens=4, temperature=0).json()["choices"][0]["text"] == \
        local_completion("small", SHORT).text
    # n: seeds seed, seed + 1, ...; best_of: the candidate with the highest mean token log-probability.
    body = complete(server, model="small", prompt=SHORT, max_tokens=4, temperature=1.0, seed=5, n=3).json()
    candidates = [local_completion("small", SHORT, temperature=1.0, seed=5 + k) for k in range(3)]
    assert [c["text"] for c in body["choices"]] == [c.text for c in candidates]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    body = complete(server, model="small", prompt=SHORT, max_tokens=4, temperature=1.0, seed=5, best_of=3).json()
    best = max(candidates, key=lambda c: sum(c.token_logprobs) / max(1, len(c.token_logprobs)))
    assert [c["text"] for c in body["choices"]] == [best.text]
    assert body["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in candidates), "all candidates count"
    # logprobs: the answering tier's own, with its most likely alternatives.
    body = complete(server, model="large", prompt=SHORT, max_tokens=4, temperature=0, logprobs=2).json()
    expected = local["large"].generate([SHORT], [SamplingParams(max_tokens=4, top_logprobs=2)])[0]
    logprobs, text = body["choices"][0]["logprobs"], body["choices"][0]["text"]
    assert logprobs["tokens"] == [local["large"].decode([t]) for t in expected.token_ids]
    assert logprobs["token_logprobs"] == pytest.approx(expected.token_logprobs, abs=1e-5)
    for top, alternatives in zip(logprobs["top_logprobs"], expected.top_logprobs):
        wanted: dict[str, float] = {}
        for token, value in alternatives:  # two tokens of one text (a lone UTF-8 byte): the likelier stays
            wanted.setdefault(local["large"].decode([token]), value)
        assert list(top) == list(wanted) and list(top.values()) == pytest.approx(list(wanted.values()), abs=1e-5)
    assert all(text[offset:].startswith(token) for offset, token in zip(logprobs["text_offset"], logprobs["tokens"]))
    # lm-evaluation-harness's loglikelihood request: token-id prompts, echo, logprobs, one token (or none).
    for max_tokens in (1, 0):
        body = complete(server, model="large", prompt=[short_ids, long_ids], max_tokens=max_tokens, temperature=0,
                        logprobs=1, echo=True, seed=1234).json()
        scored = local["large"].prompt_logprobs([short_ids, long_ids], top_logprobs=1)
        for ids, choice, (prompt_logprobs, top) in zip([short_ids, long_ids], body["choices"], scored):
            generated = local["large"].generate_ids([ids], [SamplingParams(max_tokens=1)])[0] if max_tokens else None
            logprobs = choice["logprobs"]
            assert choice["text"] == local["large"].decode(ids) + (generated.text if generated else "")
            assert logprobs["tokens"][:len(ids)] == [local["large"].decode([t]) for t in ids]
            assert len(logprobs["tokens"]) == len(ids) + (len(generated.token_ids) if generated else 0)
            assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
            assert logprobs["token_logprobs"][1:len(ids)] == pytest.approx(prompt_logprobs, abs=1e-5)
            assert [max(t, key=t.get) for t in logprobs["top_logprobs"][1:len(ids)]] == \
                [local["large"].decode([i]) for [(i, _)] in top]
    # Penalties and logit_bias change the choice exactly as the generator's SamplingParams do.
    body = complete(server, model="small", prompt=SHORT, max_tokens=4, temperature=0, frequency_penalty=2.0,
                    presence_penalty=0.5).json()
    assert body["choices"][0]["text"] == local_completion("small", SHORT, frequency_penalty=2.0,
                                                          presence_penalty=0.5).text
    forced = short_ids[0]
    body = complete(server, model="small", prompt=SHORT, max_tokens=4, temperature=0,
                    logit_bias={str(forced): 100}).json()
    assert body["choices"][0]["text"] == local["small"].decode([forced] * 4)
    # LangChain's OpenAI sends these on every call.
    body = complete(server, prompt=[SHORT], max_tokens=4, temperature=0, top_p=1, frequency_penalty=0,
                    presence_penalty=0, n=1, best_of=1, logit_bias={}, logprobs=None, seed=None, user="u").json()
    assert body["choices"][0]["text"] == local_completion("small", SHORT).text
    # A streamed batch: every choice's chunks carry its index; include_usage adds a last chunk with the usage.
    streamed = requests.post(f"{server}/v1/completions", timeout=60, json={
        "prompt": [SHORT, LONG], "max_tokens": 4, "temperature": 0, "n": 2, "stream": True,
        "stream_options": {"include_usage": True}}).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    usage = events.pop()
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == len(short_ids) + len(long_ids)
    texts: dict[int, str] = {}
    for event in events:
        texts[event["choices"][0]["index"]] = texts.get(event["choices"][0]["index"], "") + event["choices"][0]["text"]
    small, large = local_completion("small", SHORT), local_completion("large", LONG)
    assert texts == {0: small.text, 1: small.text, 2: large.text, 3: large.text}
    assert usage["usage"]["completion_tokens"] == 2 * (len(small.token_ids) + len(large.token_ids))
    # Streamed with echo and logprobs: each choice arrives whole in one chunk, as the plain request answers it.
    request = {"model": "large", "prompt": [short_ids, long_ids], "max_tokens": 1, "temperature": 0, "logprobs": 1,
               "echo": True}
    plain = complete(server, **request).json()
    streamed = requests.post(f"{server}/v1/completions", timeout=60, json={**request, "stream": True}).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert [e["choices"][0]["index"] for e in events] == [0, 1] and streamed.endswith("data: [DONE]\n\n")
    for event, choice in zip(events, plain["choices"]):
        got = event["choices"][0]
        assert got["text"] == choice["text"] and got["finish_reason"] == choice["finish_reason"]
        assert got["logprobs"]["tokens"] == choice["logprobs"]["tokens"]
        assert got["logprobs"]["token_logprobs"] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-6)
        assert got["logprobs"]["text_offset"] == choice["logprobs"]["text_offset"]


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": LONG}]
CHAT_PROMPT = f"System: Be brief.\n\nUser: {LONG}\n\nAssistant:"  # the default template (serving/chat.py)
CHAT_STOP = ("\nUser:", "\nSystem:")


def chat(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_chat_completions_render_route_and_stream(server, local) -> None:
    """Messages rendered by the chat template, routed as that prompt, answered in the chat format."""
    expected = {tier: local[tier].generate([CHAT_PROMPT], [SamplingParams(max_tokens=4, stop=CHAT_STOP,
                                                                          top_logprobs=2)])[0]
                for tier in ("small", "large")}
    body = chat(server, messages=CHAT, max_tokens=4, temperature=0).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["routed_to"] == "large", "the rendered prompt is long"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected["large"].text}
    assert body["usage"]["prompt_tokens"] == len(local["small"].encode(CHAT_PROMPT))
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": LONG[:20]}, {"type": "text",
                                                                                       "text": LONG[20:]}]}]
    body = chat(server, model="small", messages=parts, max_completion_tokens=4, temperature=0, logprobs=True,
                top_logprobs=2, n=2).json()
    assert [c["message"]["content"] for c in body["choices"]] == [expected["small"].text] * 2
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [local["small"].decode([t]) for t in expected["small"].token_ids]
    assert [c["logprob"] for c in content] == pytest.approx(expected["small"].token_logprobs, abs=1e-5)
    assert all(c["bytes"] == list(c["token"].encode()) and 1 <= len(c["top_logprobs"]) <= 2 for c in content)
    # Without max_tokens a chat answer may use what the server's limit (8 here) and the context leave.
    body = chat(server, model="small", messages=[{"role": "user", "content": SHORT}], temperature=0).json()
    assert 0 < body["usage"]["completion_tokens"] <= 8
    # Streamed: chat.completion.chunk deltas, the role first, usage last.
    streamed = requests.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    usage = events.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(expected["large"].token_ids)
    assert all(e["object"] == "chat.completion.chunk" and e["routed_to"] == "large" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected["large"].text
    assert events[-1]["choices"][0]["finish_reason"] == expected["large"].finish_reason
    # Streamed with logprobs: the whole answer in one chunk with the chat format's logprobs.
    streamed = requests.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": "small", "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True, "logprobs": True,
        "top_logprobs": 2}).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert len(events) == 1 and events[0]["choices"][0]["delta"] == {"role": "assistant",
                                                                     "content": expected["small"].text}
    content = events[0]["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(expected["small"].token_logprobs, abs=1e-5)
    # What these tiers cannot do is refused, naming the field, before any tier.
    before = tier_calls()
    for payload, param in [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                           ({"tool_choice": "required"}, "tool_choice"),
                           ({"response_format": {"type": "json_object"}}, "response_format"),
                           ({"top_logprobs": 2}, "top_logprobs"),
                           ({"max_tokens": 2, "max_completion_tokens": 2}, "max_tokens"),
                           ({"max_completion_tokens": 9}, "max_completion_tokens"),
                           ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
                           ({"messages": []}, "messages"),
                           ({"messages": [{"role": "user", "content": LONG * 3}]}, "messages")]:
        response = chat(server, **{"messages": CHAT, **payload})
        assert response.status_code == 400, (payload, response.text)
        assert response.json()["error"]["param"] == param, response.json()
    assert tier_calls() == before


def test_langchain_clients_with_their_defaults(server, local) -> None:
    """LangChain's OpenAI (completions: a list of prompts, penalties, n, logprobs: null on every call) and
    ChatOpenAI, unmodified, pointed at the cascade."""
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.OpenAI(base_url=f"{server}/v1", api_key="unused", model="small", max_tokens=4,
                                  temperature=0, max_retries=0)
    assert llm.invoke(SHORT) == local["small"].generate([SHORT], [SamplingParams(max_tokens=4)])[0].text
    assert "".join(llm.stream(SHORT)) == llm.invoke(SHORT)
    chat_model = langchain_openai.ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model="cascade",
                                             temperature=0, max_tokens=4, max_retries=0)
    answer = chat_model.invoke([("system", "Be brief."), ("human", LONG)])
    expected = local["large"].generate([CHAT_PROMPT], [SamplingParams(max_tokens=4, stop=CHAT_STOP)])[0]
    assert answer.content == expected.text
    assert "".join(chunk.content for chunk in chat_model.stream([("system", "Be brief."), ("human", LONG)])) == \
        expected.text


LM_EVAL_TASKS = """
task: moe_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{root}/choice.jsonl"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list: [{{metric: acc}}]
---
task: moe_generate
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{root}/generate.jsonl"}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 6, do_sample: false}}
metric_list: [{{metric: exact_match}}]
"""


def lm_eval_tasks(root: Path) -> Path:
    """A loglikelihood (multiple-choice) task and a generate_until task on local files, no download."""
    words = LONG.split() + SHORT.split() + "a mixture of experts model routes tokens".split()
    with open(root / "choice.jsonl", "w") as f:
        for k in range(8):
            choices = [" ".join(words[(k + 3 * j) % len(words):][:3]) for j in range(3)]
            f.write(json.dumps({"question": " ".join(words[k:k + 5]), "choices": choices, "answer": k % 3}) + "\n")
    with open(root / "generate.jsonl", "w") as f:
        for k in range(6):
            f.write(json.dumps({"prompt": " ".join(words[k:k + 6]), "target": " ".join(words[k + 6:k + 8])}) + "\n")
    for number, task in enumerate(LM_EVAL_TASKS.format(root=root).split("---")):
        (root / f"task{number}.yaml").write_text(task)
    return root


def test_lm_evaluation_harness_api_matches_transformers(server, tiers, tmp_path, monkeypatch) -> None:
    """lm-evaluation-harness's `local-completions` model (token-id prompt lists, echo + logprobs, stop strings)
    against the service, and its `hf` model on the large tier exported with `python -m moe.hf export`: every
    document's loglikelihood within 1e-4, the same generations, the same accuracy."""
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from moe.hf import main as moe_hf

    export = tmp_path / "large_hf"
    moe_hf(["export", str(tiers["large"]), str(export)])  # python -m moe.hf export CKPT DIR
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert tokenizer(LONG)["input_ids"] == load_tokenizer(tiers["large"]).encode(LONG).ids
    # The API's per-token log-probabilities against transformers' on the same weights.
    ids = tokenizer(LONG)["input_ids"]
    scored = complete(server, model="large", prompt=ids, max_tokens=0, echo=True, logprobs=0).json()
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(export).eval()(torch.tensor([ids])).logits[0]
    theirs = torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert scored["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(theirs.tolist(), abs=1e-4)

    tasks = TaskManager(include_path=str(lm_eval_tasks(tmp_path)))
    common = {"tasks": ["moe_choice", "moe_generate"], "task_manager": tasks, "log_samples": True,
              "random_seed": 0, "numpy_random_seed": 0, "torch_random_seed": 0}
    api = lm_eval.simple_evaluate(model="local-completions", model_args=(
        f"model=large,base_url={server}/v1/completions,tokenizer_backend=huggingface,tokenizer={export},"
        f"tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=96"), batch_size=4, **common)
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},dtype=float32,device=cpu,"
                                                        f"max_length=96", batch_size=4, **common)
    for task in ("moe_choice", "moe_generate"):
        mine = sorted(api["samples"][task], key=lambda sample: sample["doc_id"])
        reference = sorted(hf["samples"][task], key=lambda sample: sample["doc_id"])
        assert len(mine) == len(reference) == (8 if task == "moe_choice" else 6)
        for a, b in zip(mine, reference):
            if task == "moe_choice":  # each choice's (loglikelihood, is greedy)
                assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)
            else:
                assert a["resps"] == b["resps"], (a["resps"], b["resps"])
    assert api["results"]["moe_choice"]["acc,none"] == hf["results"]["moe_choice"]["acc,none"]
    assert api["results"]["moe_generate"]["exact_match,none"] == hf["results"]["moe_generate"]["exact_match,none"]


def test_a_stop_string_before_the_first_token_answers_empty(server, local) -> None:
    """The stop string is the first generated character: nothing is generated, and that is an answer (this was
    a 500 found by schemathesis: a completion of 0 tokens reached a Prometheus counter that refuses 0)."""
    text = local["small"].generate([SHORT], [SamplingParams(max_tokens=2)])[0].text
    assert text
    request = {"model": "small", "prompt": SHORT, "max_tokens": 2, "temperature": 0, "stop": [text[0]]}
    response = requests.post(f"{server}/v1/completions", json=request, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop",
                                  "routed_to": "small", "difficulty": None, "escalated": False, "degraded": False}
    assert body["usage"]["completion_tokens"] == 0
    streamed = requests.post(f"{server}/v1/completions", json={**request, "stream": True}, timeout=60).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert events and "".join(e["choices"][0]["text"] for e in events) == "", streamed
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and streamed.endswith("data: [DONE]\n\n")


def test_failing_or_hanging_large_tier_degrades_to_small(server, local) -> None:
    expected = local["small"].generate([LONG], [SamplingParams(max_tokens=4)])[0].text
    for prefix in ("/broken", "/hanging"):
        started = time.monotonic()
        for model in ("large", "cascade"):
            response = complete(server + prefix, model=model, prompt=LONG, max_tokens=4, temperature=0)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["routed_to"] == "small" and body["degraded"], body
            assert body["choices"][0]["text"] == expected
        body = complete(server + prefix, model="cascade-posthoc@confidence=1", prompt=LONG, max_tokens=4,
                        temperature=0).json()
        assert body["routed_to"] == "small" and body["escalated"] and body["degraded"]
        streamed = requests.post(f"{server}{prefix}/v1/completions", json={"prompt": LONG, "max_tokens": 4,
                                 "temperature": 0, "stream": True}, timeout=60).text
        events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events) == expected
        assert events[-1]["degraded"] and events[-1]["routed_to"] == "small"
        if prefix == "/hanging":
            assert time.monotonic() - started < 30, "the time-out (1 s) bounds each degraded answer"
            # The breaker: right after a time-out the hanging tier is skipped, its answers degrade at once.
            complete(server + prefix, model="large", prompt=LONG, max_tokens=1)
            started = time.monotonic()
            body = complete(server + prefix, model="large", prompt=LONG, max_tokens=1).json()
            assert body["degraded"] and time.monotonic() - started < 0.9, "skipped, not waited for (1 s)"


def test_external_tier_answers_as_its_endpoint_does(server) -> None:
    """The `external` app's large tier is an OpenAI-compatible endpoint (the `cascade` app's large tier over
    HTTP): its answers, logprobs and echo equal the endpoint's own; the cascade routes to it."""
    external = f"{server}/external"
    assert requests.get(f"{external}/healthz", timeout=10).json() == {"status": "ok"}
    for body in ({"prompt": SHORT, "max_tokens": 6, "logprobs": 2},
                 {"prompt": [SHORT, LONG], "max_tokens": 1, "echo": True, "logprobs": 1},  # lm-eval's loglikelihood
                 {"prompt": SHORT, "max_tokens": 0, "echo": True, "logprobs": 0}):
        direct = complete(server, model="large", temperature=0, **body).json()
        through = complete(external, model="large", temperature=0, **body).json()
        assert [c["routed_to"] for c in through["choices"]] == ["large"] * len(direct["choices"]), through
        assert not through["degraded"] and through["usage"] == direct["usage"]
        for mine, theirs in zip(through["choices"], direct["choices"]):
            assert mine["text"] == theirs["text"] and mine["finish_reason"] == theirs["finish_reason"]
            assert mine["logprobs"]["tokens"] == theirs["logprobs"]["tokens"]
            assert mine["logprobs"]["text_offset"] == theirs["logprobs"]["text_offset"]
            assert mine["logprobs"]["top_logprobs"] == theirs["logprobs"]["top_logprobs"]
            assert mine["logprobs"]["token_logprobs"] == pytest.approx(theirs["logprobs"]["token_logprobs"],
                                                                       abs=1e-6)
    # Streamed through the endpoint's own stream, and chosen by the cascade for a long prompt.
    expected = complete(server, model="large", prompt=LONG, max_tokens=6, temperature=0).json()["choices"][0]["text"]
    streamed = requests.post(f"{external}/v1/completions", json={"model": "cascade", "prompt": LONG, "max_tokens": 6,
                             "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
                             timeout=60).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == expected
    assert events[0]["routed_to"] == "large" and not events[-1].get("degraded")
    assert events[-1]["usage"]["completion_tokens"] > 0
    # Token ids of the cascade's vocabulary mean nothing to an endpoint: the small tier answers, degraded.
    body = complete(external, model="large", prompt=SHORT, max_tokens=2, logit_bias={"5": 1}).json()
    assert body["routed_to"] == "small" and body["degraded"], body


def test_external_tier_lost_under_load_degrades_without_5xx(server, forwarder) -> None:
    """16 clients ask the external tier while its endpoint goes away (port shut, connections reset) and comes
    back: every answer 200, degraded while it is gone, from the endpoint again once it is back."""
    from concurrent.futures import ThreadPoolExecutor

    external = f"{server}/external"
    results: list[tuple[float, int, dict]] = []
    lost_at: list[float] = []

    def client(until: float) -> None:
        while time.monotonic() < until:
            response = complete(external, model="large", prompt=SHORT, max_tokens=4, temperature=0)
            results.append((time.monotonic(), response.status_code, response.json()))

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client, start + 6) for _ in range(16)]
        time.sleep(2)
        lost_at.append(time.monotonic())
        forwarder.stop()
        for future in futures:
            future.result()
    retries = serve.get_deployment_handle("large", app_name="external").retries.remote().result()
    forwarder.start()
    statuses = [status for _, status, _ in results]
    assert statuses.count(200) == len(statuses), sorted(set(statuses))
    before = [body for at, _, body in results if at < lost_at[0]]
    after = [body for at, _, body in results if at > lost_at[0] + 1]
    assert before and all(b["routed_to"] == "large" and not b["degraded"] for b in before)
    assert after and all(b["routed_to"] == "small" and b["degraded"] for b in after)
    assert retries > 0  # connection refused (a probe after each 1 s cooldown): retried with back-off, then given up
    deadline = time.monotonic() + 30
    while True:  # back: the endpoint answers again (a fresh connection per attempt)
        body = complete(external, model="large", prompt=SHORT, max_tokens=4, temperature=0).json()
        if not body["degraded"] or time.monotonic() > deadline:
            break
    assert body["routed_to"] == "large" and not body["degraded"], body


@pytest.fixture(scope="module")
def served_data(tiers, tmp_path_factory) -> Path:
    """A small prepared corpus tokenized with the served tiers' tokenizer (its calibration split for the router)."""
    from data_pipeline.prepare import prepare
    from data_pipeline.testing import make_corpus, tiny_data_config

    root = tmp_path_factory.mktemp("served_data")
    make_corpus(root / "corpus", num_text=30, num_jsonl=4, num_parquet=4)
    return prepare(tiny_data_config(root / "corpus", root / "prepared", validation_fraction=0.1,
                                    tokenizer=str(tiers["small"] / "tokenizer.json"), calibration_fraction=0.5))


def test_calibration_labels_with_an_endpoints_logprobs(server, tiers, served_data, tmp_path) -> None:
    """`cascade.calibrate large_endpoint=... large_model=large` against the served large tier: its per-character
    NLL of every continuation equals the large checkpoint's own (where the endpoint re-tokenizes the text into
    the same ids), and the router is fitted on those labels."""
    from cascade.calibrate import calibrate, continuation_nll, query_windows, read_split_documents

    k, m, num_queries = 10, 8, 120
    report = calibrate(tiers["small"], large_endpoint=f"{server}/v1", large_model="large", data=served_data,
                       out=tmp_path / "router", num_queries=num_queries, prompt_tokens=k, continuation_tokens=m,
                       posthoc_queries=8, deferral_queries=24, router="logistic", device="cpu", verbose=False)
    assert report["large_endpoint"] == {"endpoint": f"{server}/v1", "model": "large", "unscored_queries": 0}
    assert report["quality"]["unit"] == "nats/character"
    router = DifficultyRouter.load(tmp_path / "router" / "router.json")
    assert router.metadata["quality_unit"] == "nats/character" and router.metadata["large"].startswith(server)

    # The reference: the large checkpoint in this process, per character of the continuation.
    tokenizer = load_tokenizer(tiers["small"])
    documents = read_split_documents(served_data, "calibration", num_queries, m + 1)
    windows = query_windows(documents, k, m, 0, num_queries)
    assert report["num_queries"] == len(windows)  # none left out: every continuation scored
    large, small = moe.load_checkpoint(tiers["large"]).eval(), moe.load_checkpoint(tiers["small"]).eval()
    compared = 0
    for query in report["heldout_queries"]:
        (prompt_ids, continuation_ids), _ = windows[query["index"]]
        prompt, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + continuation_ids)
        chars = len(full) - len(prompt)
        small_nll = continuation_nll(small, [(prompt_ids, continuation_ids)], 1, reduction="sum")[0] / chars
        assert query["nll_small"] == pytest.approx(float(small_nll), abs=1e-5)  # batched vs alone (fp32)
        if tokenizer.encode(full).ids == prompt_ids + continuation_ids:  # the endpoint sees the same tokens
            large_nll = continuation_nll(large, [(prompt_ids, continuation_ids)], 1, reduction="sum")[0] / chars
            assert query["nll_large"] == pytest.approx(float(large_nll), abs=1e-4)
            compared += 1
        assert query["label"] == int(query["nll_small"] - query["nll_large"] > report["settings"]["margin"])
    assert compared >= len(report["heldout_queries"]) // 2 > 0
    assert 0 < report["label_rate"] < 1
    with pytest.raises(ValueError, match=r"^large_model: .* does not serve 'gpt-4'"):  # checked before any work
        calibrate(tiers["small"], large_endpoint=f"{server}/v1", large_model="gpt-4", data=served_data,
                  out=tmp_path / "refused", device="cpu")
    assert not (tmp_path / "refused").exists()


def test_serving_an_external_tier_without_a_router_calibrates_against_it(server, tiers, served_data,
                                                                          tmp_path, capsys) -> None:
    """No `routing.router` with an external large tier: the small tier is calibrated against the endpoint on first
    start (cached under routing.calibration_root), as a checkpoint pair is."""
    import shutil

    from serving.app import router_file_for

    small = tmp_path / "runs" / "small" / "checkpoints" / "step_00000001"
    shutil.copytree(tiers["small"], small)
    (small.parent.parent / "config.yaml").write_text(f"data:\n  output: {served_data}\n")
    cfg = serve_cfg(small, tiers["large"], tiers["router"], "routing.router=null", "large=null",
                    f"tiers.large.endpoint={server}/v1", "tiers.large.model=large",
                    f"routing.calibration_root={tmp_path / 'calibration'}")
    facts = tier_facts(cfg)
    path = router_file_for(cfg, facts)
    router = DifficultyRouter.load(path)
    assert path.parent.parent == tmp_path / "calibration"
    assert router.metadata["large"] == f"{server}/v1 (large)" and router.metadata["quality_unit"] == "nats/character"
    assert router_file_for(cfg, facts) == path and "cached calibration" in capsys.readouterr().out


@pytest.mark.parametrize("payload,status,param", [
    (b"{not json", 400, None),
    ({"max_tokens": 2}, 400, "prompt"),
    ({"prompt": 17}, 400, "prompt"),
    ({"prompt": ["a", 1]}, 400, "prompt"),                       # a batch holds one kind of prompt
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [5, 99999], "max_tokens": 2}, 400, "prompt"),    # a token id outside the vocabulary
    ({"prompt": ["x", ""], "max_tokens": 2}, 400, "prompt"),
    ({"prompt": "x", "n": 9}, 400, "n"),
    ({"prompt": "x", "n": 3, "best_of": 2, "max_tokens": 2}, 400, "best_of"),
    ({"prompt": "x", "best_of": 3, "stream": True, "max_tokens": 2}, 400, "best_of"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),             # 0 only with echo
    ({"prompt": "x", "stream_options": {"include_usage": True}, "max_tokens": 2}, 400, "stream_options"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"prompt": "x", "logit_bias": {"the": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"99999": 1}, "max_tokens": 2}, 400, "logit_bias"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 9}, 400, "max_tokens"),      # above routing.max_tokens_limit=8
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "model": "cascade@fraction=2"}, 404, "model"),
    ({"prompt": "x", "model": "cascade@budget=0.01", "max_tokens": 2}, 400, "model"),  # below the small tier's cost
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": LONG * 3, "max_tokens": 8}, 400, "prompt"),      # more tokens than the context of 96
    ({"prompt": "y" * 2500, "max_tokens": 2}, 400, "prompt"),                 # above routing.max_prompt_chars
    ({"prompt": "z" * 30000}, 413, None),                       # above routing.max_body_bytes
])
def test_bad_requests_get_4xx_naming_the_field_and_reach_no_model(server, payload, status, param) -> None:
    before = tier_calls()
    if isinstance(payload, bytes):
        response = requests.post(f"{server}/v1/completions", data=payload,
                                 headers={"Content-Type": "application/json"}, timeout=30)
    else:
        response = requests.post(f"{server}/v1/completions", json=payload, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if param:
        assert error["param"] == param and param in error["message"], error
    assert tier_calls() == before, "a refused request never reaches a tier"


def test_prometheus_metrics(server) -> None:
    complete(server, model="cascade-posthoc@confidence=1", prompt=SHORT, max_tokens=2)
    complete(server + "/broken", model="large", prompt=SHORT, max_tokens=2)
    names = ["ray_moe_serve_requests_total", "ray_moe_serve_escalations_total", "ray_moe_serve_degraded_total",
             "ray_moe_serve_tokens_generated_total", "ray_moe_serve_latency_seconds_bucket"]
    deadline = time.monotonic() + 60
    while True:  # replicas export every few seconds: wait until both requests above are counted
        found = prometheus_lines(names, timeout_s=60)
        if (any('tier="large"' in line for line in found["ray_moe_serve_requests_total"])
                and any('failed_tier="large"' in line for line in found["ray_moe_serve_degraded_total"])
                and any('tier="small"' in line for line in found["ray_moe_serve_latency_seconds_bucket"])):
            break
        assert time.monotonic() < deadline, found
        time.sleep(2)


def test_schemathesis_finds_no_server_error(server) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    statuses: dict[str, list[int]] = {}
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def check(case) -> None:
            response = case.call(base_url=server, timeout=60)
            statuses.setdefault(case.path, []).append(response.status_code)
            assert response.status_code < 500, (case.path, case.body, response.status_code, response.text[:300])
            if isinstance(case.body, dict) and case.path == "/v1/completions":
                # The same fuzzed prompt, sampling fields and stop strings, with a model and a length this
                # deployment accepts, so that generation itself is fuzzed too, not only validation. Sampling is
                # seeded, so that a failure reproduces and Hypothesis can shrink it.
                body = {**case.body, "model": "cascade", "max_tokens": 2}
                body["seed"] = body.get("seed") if isinstance(body.get("seed"), int) else 0
                again = requests.post(f"{server}/v1/completions", json=body, timeout=60)
                statuses["generated"] = statuses.get("generated", []) + [again.status_code]
                assert again.status_code < 500, (body, again.status_code, again.text[:3000])

        check()
    assert {"/healthz", "/v1/models", "/v1/completions"} <= set(statuses)
    assert len(statuses["/v1/completions"]) >= 20 and 200 in statuses["generated"], statuses


def test_mismatched_tokenizers_are_refused(tiers) -> None:
    with pytest.raises(ValueError, match="tokenizers differ") as err:
        check_tiers(str(tiers["small"]), str(tiers["foreign"]))
    assert str(tiers["small"] / "tokenizer.json") in str(err.value)
    assert str(tiers["foreign"] / "tokenizer.json") in str(err.value)


@pytest.mark.extended
def test_serve_config_file_deploys_the_cascade(server, tiers, local) -> None:
    """infra/serve_config.yaml as `serve run` deploys it: validated by Serve's schema, built by a Serve task
    that imports its import_path and calls it with its args, its deployment overrides applied."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = serve_config_app(tiers)
    # This module's Serve already runs (its http_options stand) and its cascade holds "/"; fit beside the
    # three applications on 4 CPUs.
    app.update(name="from-config", route_prefix="/from-config")
    app["args"].update({"tiers.small.num_cpus": 0.1, "tiers.large.num_cpus": 0.1})
    client = _get_global_client()
    # What `serve run CONFIG` calls once Serve is up (ray/serve/scripts.py); `serve deploy` and KubeRay reach
    # the same controller method through the dashboard's REST API.
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    try:
        deadline = time.monotonic() + 120
        while (status := serve.status().applications.get("from-config")) is None or status.status != "RUNNING":
            assert status is None or status.status not in ("DEPLOY_FAILED", "UNHEALTHY"), status.message
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert set(status.deployments) == {"small", "large", "ingress"}
        deployed = client.get_serve_details()["applications"]["from-config"]["deployments"]
        for override in app["deployments"]:
            config = deployed[override["name"]]["deployment_config"]
            for key, value in override.items():
                if key == "autoscaling_config":
                    assert {k: config[key][k] for k in value} == value, config[key]
                elif key != "name":
                    assert config[key] == value, (override["name"], key, config[key])
        for prompt, tier in ((SHORT, "small"), (LONG, "large")):
            body = complete(server + "/from-config", prompt=prompt, max_tokens=4, temperature=0).json()
            assert body["routed_to"] == tier, body
            assert body["choices"][0]["text"] == local[tier].generate([prompt], [SamplingParams(max_tokens=4)])[0].text
    finally:
        serve.delete("from-config")


@pytest.mark.extended
def test_cli_serves_until_interrupted(tiers, server) -> None:
    """`python -m moe.serve small=A large=B port=P`: prints the URL, answers, stops on Ctrl-C.

    No resource overrides: the default tiers share this machine's CPUs (on a 2-core machine 1 CPU each plus
    the ingress's 0.1 never started). Started with SIGINT ignored (`trap "" INT; exec ...`), as a background
    job of a script (CI) inherits it: Ctrl-C must still stop the service."""
    port = free_port()
    command = [sys.executable, "-m", "moe.serve", f"small={tiers['small']}", f"large={tiers['large']}",
               f"routing.router={tiers['router']}", f"port={port}", f"dashboard_port={free_port()}"]
    proc = subprocess.Popen(["bash", "-c", 'trap "" INT; exec "$@"', "moe.serve", *command],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines[-30:])
            lines.append(line)
            if "running; Ctrl-C to stop" in line:
                break
        text = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1/completions" in text and "Ray dashboard: http://127.0.0.1:" in text
        body = requests.post(f"http://127.0.0.1:{port}/v1/completions",
                             json={"prompt": SHORT, "max_tokens": 2}, timeout=60).json()
        assert body["routed_to"] == "small"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0


@pytest.mark.extended
def test_healthz_answers_while_a_tier_starts(tiers, server) -> None:
    """While Serve starts a tier's replicas (the `slow_start` drill: 15 s more, as a big checkpoint loading),
    /healthz answers, naming that tier as starting; `ok` once it runs. (The module's
    apps hold 3.6 of the session Ray's 4 CPUs; this one takes the 0.3 left.)"""
    import threading

    cfg = serve_cfg(tiers["small"], tiers["large"], tiers["router"], "tiers.large.fault=slow_start",
                    "tiers.small.num_cpus=0.1", "tiers.large.num_cpus=0.1")
    app = build_app(cfg, tier_facts(cfg), tiers["router"])
    deploying = threading.Thread(target=serve.run, args=(app,), kwargs={"name": "starting",
                                                                         "route_prefix": "/starting"})
    deploying.start()
    seen = []
    try:
        while deploying.is_alive():
            started = time.monotonic()
            try:  # Serve's proxy holds a request until the ingress replica itself runs (seconds), never longer
                response = requests.get(f"{server}/starting/healthz", timeout=20)
            except requests.Timeout:
                pytest.fail("/healthz held for 20 s while the app started")
            seen.append((response.status_code, response.json() if response.status_code != 404 else None,
                         round(time.monotonic() - started, 1)))
            time.sleep(0.5)
        deploying.join()
        body = requests.get(f"{server}/starting/healthz", timeout=10).json()
        assert body == {"status": "ok"}, body
        # Answered while the large tier was still starting, the small one already answering:
        assert any(status == 200 and b["status"] == "degraded" and b["starting"] == ["large"]
                   for status, b, _ in seen if b is not None), seen
        assert all(status in (200, 404, 503) for status, _, _ in seen), seen
    finally:
        deploying.join(timeout=60)
        serve.delete("starting")


def test_cli_refuses_mismatched_tokenizers_before_ray(tiers) -> None:
    out = subprocess.run([sys.executable, "-m", "moe.serve", f"small={tiers['small']}", f"large={tiers['foreign']}",
                          f"routing.router={tiers['router']}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert str(tiers["foreign"] / "tokenizer.json") in errors[0]


@pytest.mark.extended
def test_cli_refuses_replicas_that_do_not_fit_before_ray(tiers) -> None:
    """A tier that asks for more CPUs than this machine has would wait forever to be scheduled: exit 1 at once,
    naming the key, what was asked and what the machine has."""
    cpus = os.cpu_count()
    out = subprocess.run([sys.executable, "-m", "moe.serve", f"small={tiers['small']}", f"large={tiers['large']}",
                          f"routing.router={tiers['router']}", "tiers.small.num_cpus=1",
                          f"tiers.large.num_cpus={cpus}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "tiers.large.num_cpus" in errors[0] and f"the Ray cluster has {cpus}" in errors[0], errors[0]
    assert "Ray dashboard" not in out.stdout + out.stderr, "refused before Ray started"


@pytest.mark.parametrize("key", ["port", "dashboard_port"])
def test_a_port_in_use_is_refused_before_ray(tiers, key: str) -> None:
    """`moe.serve` on a port another local run holds (here a listening socket): refused with the key named by
    the checks of a local start, which run before its Ray starts."""
    from serving.app import checked_local_app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "dashboard_port" if key == "port" else "port"
        cfg = serve_cfg(tiers["small"], tiers["large"], tiers["router"], f"{key}={port}", f"{other}={free_port()}")
        with pytest.raises(ValueError, match=rf"^invalid configuration: {key}: 127\.0\.0\.1:{port} is in use"):
            checked_local_app(cfg)
    checked_local_app(cfg)  # the port free again
