"""One tier of the cascade: a moe checkpoint behind a Ray Serve deployment.

Every tier is this same class built from a checkpoint directory (a training
checkpoint of `moe.train`, which carries its tokenizer.json). Generation and
prefill are batched across concurrent requests with `@serve.batch`. All torch
work runs on one worker thread of the replica: the event loop keeps answering
Serve's health checks, calls never oversubscribe the replica's CPUs, and the
difficulty prefill of a prompt is kept for its generation when the cascade
routes it to this tier (`Generator.prefill_signals`).

The ingress sends token ids (it tokenizes once, to check prompt length); all
tiers share one tokenizer, which `serving.app.check_tiers` enforces. Requests
and answers are the records of `serving.records`.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from ray import serve

from serving.records import StreamDelta, TierAnswer, TierRequest

SLOW_START_S = 15.0  # the `slow_start` drill's delay


def _answer(completion: Any) -> TierAnswer:
    """A `moe.generate.Completion` as the record the ingress receives."""
    return TierAnswer(text=completion.text, finish_reason=completion.finish_reason,
                      prompt_tokens=len(completion.prompt_token_ids), completion_tokens=len(completion.token_ids),
                      confidence=completion.mean_confidence, token_ids=list(completion.token_ids),
                      token_logprobs=list(completion.token_logprobs), top_logprobs=list(completion.top_logprobs))


class Tier:
    """A Ray Serve deployment class (wrapped with `serve.deployment` in `serving.app`).

    Args:
        name: the tier's name (`small`, `large`).
        checkpoint: a moe checkpoint directory with tokenizer.json.
        dtype: "float32" or "bfloat16".
        num_threads: torch threads (the replica's CPUs).
        fault: drills only: "error" fails every call, "hang" never answers, "slow_start" takes
            SLOW_START_S longer to start (a large checkpoint loading).
        hidden: the pooled hidden states `signals` adds after the signals (the
            router's `HiddenFeatures` as a dict), or None.
        compile_decode: decode with compiled steps (`Generator(compile_decode=True)`); both of its graphs
            (one row, 2+ rows) are compiled here, before the replica takes a request.
    """

    def __init__(self, name: str, checkpoint: str, dtype: str = "float32", num_threads: int = 1,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, fault: Optional[str] = None,
                 hidden: Optional[dict[str, Any]] = None, compile_decode: bool = False) -> None:
        import torch

        import moe
        from moe.difficulty import HiddenFeatures
        from moe.generate import Generator, LiveBatch, load_tokenizer

        if fault == "slow_start":
            time.sleep(SLOW_START_S)
        torch.set_num_threads(max(1, num_threads))
        self.name = name
        self.checkpoint = str(Path(checkpoint).resolve())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = moe.load_checkpoint(checkpoint, device=device,
                                    dtype=torch.bfloat16 if dtype == "bfloat16" else None).eval()
        self.generator = Generator(model, load_tokenizer(checkpoint), max_batch_size=max_batch_size, device=device,
                                   compile_decode=compile_decode)
        if compile_decode:
            self._compile_decoding_steps()
        self.hidden = HiddenFeatures(**hidden) if hidden is not None else None
        if self.hidden is not None:
            self.hidden.check_model(model.config, f"the {name} tier ({checkpoint})")
        self.fault = fault
        self.num_calls = 0
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tier-{name}")
        self.streams = LiveBatch(self.generator)  # every live stream, decoded as one batch
        self.listeners: dict[Any, asyncio.Queue] = {}
        self.stepper: Optional[asyncio.Task] = None
        # @serve.batch sizes are fixed at decoration; set them per deployment from the config.
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.signals_batch.set_max_batch_size(max_batch_size)
        self.signals_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _compile_decoding_steps(self) -> None:
        """Two tokens for one prompt, then for two: the first request of either kind would wait for a compile."""
        from moe.generate import SamplingParams

        params = SamplingParams(max_tokens=2, ignore_eos=True)
        for rows in (1, min(2, self.generator.max_batch_size)):
            self.generator.generate_ids([[0]] * rows, [params] * rows)

    def calls(self) -> int:
        """How many generate/signals/stream calls this replica received (tests check bad requests reach none)."""
        return self.num_calls

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._torch_thread, fn, *args)

    async def _drill(self) -> None:
        self.num_calls += 1
        if self.fault == "error":
            raise RuntimeError(f"tier {self.name!r}: injected fault (tiers.{self.name}.fault=error)")
        if self.fault == "hang":
            await asyncio.sleep(3600)

    async def ping(self) -> bool:
        """The ingress's /healthz: answers when this replica can take a request (drills fail or hang it too)."""
        if self.fault == "error":
            raise RuntimeError(f"tier {self.name!r}: injected fault (tiers.{self.name}.fault=error)")
        if self.fault == "hang":
            await asyncio.sleep(3600)
        return True

    def info(self) -> dict[str, Any]:
        config = self.generator.model.config
        return {"name": self.name, "checkpoint": self.checkpoint, "max_seq_len": config.max_seq_len,
                "vocab_size": config.vocab_size}

    async def generate(self, request: TierRequest) -> TierAnswer:
        """One completion (with `echo`, the prompt's own log-probabilities too; max_tokens 0 generates nothing)."""
        await self._drill()
        started = time.perf_counter()
        if request.max_tokens == 0:  # echo only: score the prompt, generate nothing
            result = TierAnswer(text="", finish_reason="length", prompt_tokens=len(request.prompt_ids),
                                completion_tokens=0, confidence=1.0)
        else:
            result = await self.generate_batch(request)
        if request.echo:
            [(logprobs, top)] = await self._run(self.generator.prompt_logprobs, [request.prompt_ids],
                                                request.top_logprobs)
            result.prompt_logprobs, result.prompt_top_logprobs = logprobs, top
        result.latency_s = time.perf_counter() - started
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, requests: list[TierRequest]) -> list[TierAnswer]:
        completions = await self._run(self.generator.generate_ids, [r.prompt_ids for r in requests],
                                      [r.sampling_params() for r in requests])
        return [_answer(c) for c in completions]

    async def signals(self, prompt_ids: list[int]) -> list[float]:
        """The pre-generation difficulty signals of one prompt (moe.difficulty.SIGNAL_NAMES order), then the
        router's hidden-state features when the tier was built with `hidden`."""
        await self._drill()
        return await self.signals_batch(prompt_ids)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def signals_batch(self, prompts: list[list[int]]) -> list[list[float]]:
        signals = await self._run(self.generator.prefill_signals, prompts, self.hidden)
        return [row.tolist() for row in signals]

    async def stream(self, request: TierRequest) -> AsyncIterator[Any]:
        """Yields a `StreamDelta` as tokens arrive, then the `TierAnswer`.

        Every live stream of this replica decodes in one continuous batch
        (`moe.generate.LiveBatch`): a stream joins at the next step, and one
        decode step advances all of them."""
        await self._drill()
        live = self.streams.add(request.prompt_ids, request.sampling_params())
        queue: asyncio.Queue = asyncio.Queue()
        self.listeners[live] = queue
        if self.stepper is None or self.stepper.done():
            self.stepper = asyncio.create_task(self._step_streams())
        done = False
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                done = isinstance(item, TierAnswer)
                yield item
        finally:
            if not done:  # the client went away: free the stream's row
                self.streams.cancel(live)
            self.listeners.pop(live, None)

    async def _step_streams(self) -> None:
        """Steps the live batch on the torch thread while any stream is queued or running; hands out text."""
        while True:
            try:
                more = await self._run(self.streams.step)
            except Exception as err:  # a failed step fails every live stream, and the batch starts afresh
                for queue in self.listeners.values():
                    queue.put_nowait(err)
                self.listeners.clear()
                self.streams = type(self.streams)(self.generator)
                return
            for live, queue in list(self.listeners.items()):
                if live.pending:
                    delta, live.pending = live.pending, ""
                    queue.put_nowait(StreamDelta(delta))
                if live.finish_reason is not None and live.finish_reason != "cancelled":
                    queue.put_nowait(_answer(live.completion()))
                    del self.listeners[live]
            if not more and not self.streams.waiting:  # no await since the check: a new stream restarts us
                return
