"""Batched incremental decoding with a KV cache: sampling, stop strings, streaming.

Shape legend: B running sequences, S prompt positions (right-padded), V vocabulary.

    model = moe.load_checkpoint(ckpt).eval()
    generator = Generator(model, load_tokenizer(ckpt), max_batch_size=8)
    [completion] = generator.generate(["def f(x):"], [SamplingParams(max_tokens=32, stop=("\\n\\n",))])
    for delta, done in generator.stream("def f(x):", SamplingParams(max_tokens=32)):
        ...

NOTE: the decoding loop (`Generator._run`), continuous batching over a KV cache.
1. Admission: while fewer than `max_batch_size` sequences run and requests
   wait, the waiting ones (up to the free rows) are prefilled together:
   right-padded to the longest prompt, each at its own positions 0..n-1, into a
   fresh `KVCache` that counts only the real tokens. The logits at each
   prompt's last token give its first token. The new rows join the running
   cache (`KVCache.concat`). A prompt prefilled by `prefill_signals` just
   before reuses that prefill.
2. Decode step: the last token of every running sequence, one row each, at
   that sequence's own position; the cache masks slots past a row's length.
3. Each request draws from its own row with its own `torch.Generator` (seeded
   by `SamplingParams.seed`), so its tokens do not depend on the batch it
   decodes in; finished rows leave the cache (`KVCache.select`).
MoE routing is dropless during generation whatever the model's capacity
factor (with a capacity limit a token's experts would depend on the other
tokens of the batch); the router has no jitter in eval mode.

Text: requests with stop strings, and streams, are detokenized after every
token. The text of an unfinished UTF-8 character (its bytes split across
tokens) decodes to U+FFFD and is held back until the character completes;
text that could be the start of a stop string is held back until it cannot.
The EOS token ends a sequence (finish_reason "stop") and is not part of the
completion.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch

from moe.decode import CompiledDecoder
from moe.difficulty import HiddenFeatures, check_prompt_ids, feature_row, right_pad
from moe.files import TOKENIZER_NAME
from moe.model import KVCache, MoETransformer

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = TOKENIZER_NAME
_REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 character decodes to

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Attributes:
        max_tokens: tokens to generate at most (>= 1).
        temperature: 0 for greedy decoding; > 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling: only the smallest set of most likely tokens
            whose probability reaches top_p, in (0, 1].
        seed: seeds the request's own generator: the same seed gives the same
            tokens, alone or inside a batch. None: drawn from torch's global RNG.
        stop: stop strings; the text is cut before the first occurrence of
            any of them (finish_reason "stop").
        presence_penalty, frequency_penalty: as OpenAI defines them, in
            [-2, 2]: before each draw, the logit of every token already
            generated c > 0 times is lowered by presence_penalty +
            c * frequency_penalty (the prompt's tokens do not count).
        logit_bias: token id -> a bias in [-100, 100] added to its logit
            before each draw (-100 in effect bans the token, 100 forces it).
        top_logprobs: also record, at each generated token, the ids and
            log-probabilities of the this many most likely tokens (0 to 20).
        ignore_eos: keep generating past the EOS token until max_tokens or a
            stop string (vLLM's extension; load tools ask for exact lengths).
    The penalties and biases change which token is drawn; the log-probabilities
    recorded are the model's own (before penalties, biases, temperature and top_p).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2 ** 63):
            raise ValueError(f"SamplingParams.seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"SamplingParams.stop must be a tuple of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"SamplingParams.{name} must be a number in [-2, 2], got {value!r}")
        bias = tuple(self.logit_bias.items()) if isinstance(self.logit_bias, dict) else self.logit_bias
        if not isinstance(bias, (tuple, list)) or not all(
                isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], int)
                and not isinstance(pair[0], bool) and pair[0] >= 0 and _is_number(pair[1]) and -100 <= pair[1] <= 100
                for pair in bias):
            raise ValueError(f"SamplingParams.logit_bias must map token ids >= 0 to numbers in [-100, 100], "
                             f"got {self.logit_bias!r}")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        if not isinstance(self.top_logprobs, int) or isinstance(self.top_logprobs, bool) or not \
                0 <= self.top_logprobs <= 20:
            raise ValueError(f"SamplingParams.top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")

    @property
    def changes_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass
class Completion:
    """One generated answer.

    Attributes:
        prompt_token_ids: the prompt.
        token_ids: generated tokens; with a stop string only those that end
            before it; never the EOS token.
        text: the decoded generated text, cut before a stop string.
        finish_reason: "stop" (EOS or a stop string) or "length" (max_tokens).
        token_logprobs: log p of each token of `token_ids` under the model's
            untempered distribution (temperature and top_p not applied).
        top_logprobs: per token of `token_ids`, the `SamplingParams.top_logprobs`
            most likely (token id, log p) of that distribution, most likely
            first; empty lists when none were asked for.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    token_logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def mean_confidence(self) -> float:
        """Mean over generated tokens of exp(token_logprob); 1.0 when none was generated."""
        if not self.token_logprobs:
            return 1.0
        return sum(math.exp(lp) for lp in self.token_logprobs) / len(self.token_logprobs)


def load_tokenizer(checkpoint_dir: PathLike, *, eos_token: str = EOS_TOKEN):
    """The `tokenizers.Tokenizer` of a training checkpoint (its `tokenizer.json`).

    Raises:
        FileNotFoundError: no tokenizer.json in `checkpoint_dir`.
        ValueError: an unreadable file, or one without `eos_token`.
    """
    from tokenizers import Tokenizer

    path = Path(checkpoint_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: checkpoints written by moe.train carry their data's "
                                f"tokenizer.json; copy the prepared data's tokenizer.json there")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({err})") from None
    if tokenizer.token_to_id(eos_token) is None:
        raise ValueError(f"{path} has no EOS token {eos_token!r}")
    return tokenizer


# ---- sampling ----------------------------------------------------------------------------

def sampling_distribution(logits_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a sampled token is drawn from (float64, on the logits' device).

    softmax(logits / temperature), restricted to the nucleus: the most likely
    tokens, in order, up to and including the first at which the cumulative
    probability reaches top_p; renormalised. Needs temperature > 0.
    """
    # Shift by the max first: with a tiny temperature (5e-324 is a valid float) logits / temperature
    # overflows to +-inf and softmax gives NaN, while the shifted form tends to the greedy one-hot
    # (uniform over tied maxima), the true limit of temperature -> 0.
    logits_V = logits_V.to(torch.float64)
    probs_V = torch.softmax((logits_V - logits_V.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_V, order_V = probs_V.sort(descending=True)
        mass_before_V = sorted_V.cumsum(0) - sorted_V
        keep_sorted_V = mass_before_V < top_p  # the most likely token always stays
        keep_V = torch.zeros_like(keep_sorted_V).scatter(0, order_V, keep_sorted_V)
        probs_V = torch.where(keep_V, probs_V, torch.zeros_like(probs_V))
        probs_V = probs_V / probs_V.sum()
    return probs_V


def sample_from(probs_V: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Inverse-CDF draw of one token id (a 0-d tensor) with one uniform number of `generator`."""
    cdf_V = probs_V.cumsum(0)
    u = torch.rand((), generator=generator, dtype=torch.float64, device=probs_V.device) * cdf_V[-1]
    index = torch.searchsorted(cdf_V, u.reshape(1), right=True)[0]
    # u * total can round up to the total: fall back to the last token with probability.
    last_possible = torch.nonzero(probs_V > 0).max()
    return torch.minimum(index, last_possible)


# ---- text --------------------------------------------------------------------------------

def _find_stop(text: str, stop: tuple[str, ...]) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class _TextTracker:
    """Incremental detokenization of one sequence: stop strings and stream deltas.

    The text it emits only grows: each update releases text up to a point
    that no later token can change (see the module NOTE), so the deltas
    concatenate to the final text.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self.decode = decode
        self.stop = stop
        self.emitted = 0  # characters released so far
        self.stop_at: Optional[int] = None
        self.text = ""  # the completion's text once finished

    def update(self, token_ids: list[int], final: bool = False) -> str:
        """Decodes `token_ids`; returns the newly releasable text (the delta)."""
        text = self.decode(token_ids)
        if not final:
            text = text.rstrip(_REPLACEMENT)
        hit = _find_stop(text, self.stop)
        if hit is not None:
            self.stop_at = safe = hit
        elif final:
            safe = len(text)
        else:
            safe = len(text) - _held_back(text, self.stop)
        delta = text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        if hit is not None or final:
            self.text = text[:safe]
        return delta


def _tokens_before(decode: Callable[[list[int]], str], token_ids: list[int], text: str) -> int:
    """How many leading tokens decode to a prefix of `text` (the tokens wholly before a stop string)."""
    for n in range(len(token_ids), 0, -1):
        prefix = decode(token_ids[:n])
        if len(prefix) <= len(text) and text.startswith(prefix):
            return n
    return 0


class _Request:
    """The decoding state of one request."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, device: torch.device,
                 decode: Callable[[list[int]], str], stream: bool) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(seed)
        self.decode = decode
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.counts: dict[int, int] = {}  # generated tokens, for the presence and frequency penalties
        self.finish_reason: Optional[str] = None
        self.tracker = _TextTracker(decode, params.stop) if (params.stop or stream) else None
        self.pending = ""  # stream text not yet handed out

    def add(self, token: int, logprob: float, eos_id: Optional[int],
            top: Optional[list[tuple[int, float]]] = None) -> None:
        """Records one generated token and decides whether the request is finished."""
        if self.finish_reason is not None:  # cancelled while its row was still in the decode step
            return
        if token == eos_id:
            self._finish("stop")
            return
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self.top_logprobs.append(top or [])
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.tracker is not None:
            self.pending += self.tracker.update(self.token_ids)
            if self.tracker.stop_at is not None:
                self.finish_reason = "stop"
                return
        if len(self.token_ids) >= self.params.max_tokens:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        if self.tracker is not None:
            self.pending += self.tracker.update(self.token_ids, final=True)
            if self.tracker.stop_at is not None:
                reason = "stop"
        self.finish_reason = reason

    def completion(self) -> Completion:
        token_ids, logprobs, top = self.token_ids, self.logprobs, self.top_logprobs
        if self.tracker is None:
            text = self.decode(token_ids)
        else:
            text = self.tracker.text
            if self.tracker.stop_at is not None:
                n = _tokens_before(self.decode, token_ids, text)
                token_ids, logprobs, top = token_ids[:n], logprobs[:n], top[:n]
        return Completion(self.prompt_ids, list(token_ids), text, self.finish_reason, list(logprobs),
                          [list(t) for t in top])

    def adjust(self, logits_V: torch.Tensor) -> torch.Tensor:
        """The logits this request draws from: the model's, less the penalties, plus the biases."""
        params = self.params
        logits_V = logits_V.to(torch.promote_types(logits_V.dtype, torch.float32)).clone()
        if self.counts and (params.presence_penalty or params.frequency_penalty):
            ids = torch.tensor(list(self.counts), dtype=torch.int64, device=logits_V.device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits_V.dtype, device=logits_V.device)
            logits_V.index_add_(0, ids, -(params.presence_penalty + params.frequency_penalty * counts))
        for token, bias in params.logit_bias:  # ids checked against the vocabulary in `_requests`
            logits_V[token] += bias
        return logits_V


# ---- the generator -----------------------------------------------------------------------

class Generator:
    """Batched generation of one model (one tier of the cascade).

    Args:
        model: the model; moved to `device` and put in eval mode.
        tokenizer: its `tokenizers.Tokenizer` (`load_tokenizer`). Text that
            spells a special token is encoded as plain text, as in training
            (`encode_special_tokens` is set on it).
        max_batch_size: sequences decoded together at most.
        device: where the model runs.
        eos_token: ends a sequence; None: only max_tokens and stop strings do.
        prefill_memo: prefills `prefill_signals` keeps for a following
            generation of the same prompt (default max_batch_size; 0 keeps none).
        compile_decode: run each decoding step as one compiled graph
            (`moe.decode.CompiledDecoder`): faster per token once compiled,
            but the first step of one row, and of 2+ rows, compiles (seconds
            to tens of seconds); prefills stay eager. The same tokens as the
            eager step up to float rounding. True, or a dict of options for
            `torch.compile` (e.g. {"backend": "aot_eager"}).
    """

    def __init__(self, model: MoETransformer, tokenizer: Any, *, max_batch_size: int = 8,
                 device: Union[str, torch.device] = "cpu", eos_token: Optional[str] = EOS_TOKEN,
                 prefill_memo: Optional[int] = None, compile_decode: Union[bool, dict[str, Any]] = False) -> None:
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ValueError(f"Generator.max_batch_size must be a positive integer, got {max_batch_size!r}")
        if not isinstance(compile_decode, (bool, dict)):
            raise ValueError(f"Generator.compile_decode must be a bool or a dict of torch.compile options, got "
                             f"{compile_decode!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        tokenizer.encode_special_tokens = True
        self.eos_id: Optional[int] = None
        if eos_token is not None:
            self.eos_id = tokenizer.token_to_id(eos_token)
            if self.eos_id is None:
                raise ValueError(f"Generator.tokenizer has no EOS token {eos_token!r}")
        self.max_batch_size = max_batch_size
        self.prefill_memo = max_batch_size if prefill_memo is None else prefill_memo
        self._memo: OrderedDict[tuple[int, ...], tuple[KVCache, torch.Tensor]] = OrderedDict()
        self._memo_lock = threading.Lock()  # Ray Serve runs signals and generation in threads
        self._decoder = None
        if compile_decode:
            self._decoder = CompiledDecoder(self.model, **({} if compile_decode is True else compile_decode))

    def encode(self, prompt: str) -> list[int]:
        """Token ids of `prompt` (no EOS appended)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[Completion]:
        """Completions of text prompts, decoded in batches (see `generate_ids`)."""
        return self.generate_ids([self.encode(p) for p in prompts], params)

    def generate_ids(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Completions of token-id prompts, one `SamplingParams` each, decoded together.

        Raises:
            ValueError: a params list of another length or type, an empty
                prompt, unknown token ids, or a prompt longer than
                max_seq_len - max_tokens (the message names `prompt` and the counts).
        """
        requests = self._requests(prompt_ids, params, stream=False)
        for _ in self._run(requests):
            pass
        return [r.completion() for r in requests]

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[tuple[str, Optional[Completion]]]:
        """Yields (text_delta, None) as text becomes final, then ("", completion); see `stream_ids`."""
        return self.stream_ids(self.encode(prompt), params)

    def stream_ids(self, prompt_ids: list[int], params: SamplingParams
                   ) -> Iterator[tuple[str, Optional[Completion]]]:
        """Streams one request (decoded alone).

        The deltas (never empty) concatenate to `completion.text`: text past a
        stop string is never yielded, and text that may still become a stop
        string or an unfinished UTF-8 character is held back.
        """
        [request] = self._requests([prompt_ids], [params], stream=True)  # raises now, not at the first next()
        return self._stream(request)

    def _stream(self, request: _Request) -> Iterator[tuple[str, Optional[Completion]]]:
        for _ in self._run([request]):
            if request.pending:
                delta, request.pending = request.pending, ""
                yield delta, None
        yield "", request.completion()

    @torch.no_grad()
    def prefill_signals(self, prompt_ids: list[list[int]], hidden: Optional[HiddenFeatures] = None) -> torch.Tensor:
        """The difficulty signals of each prompt (`moe.difficulty.SIGNAL_NAMES`) from this generator's prefill.

        The same signals as `moe.difficulty.prompt_signals` (up to float
        rounding), computed by the prefill generation uses; the last
        `prefill_memo` prefills are kept, so generating one of these prompts
        next (pre-generation routing chose this tier) skips its prefill.

        Args:
            prompt_ids: the prompts.
            hidden: also these pooled hidden states (a probe router's features).
        Returns:
            (N, len(SIGNAL_NAMES) [+ hidden.width]) float64 on the CPU.
        """
        check_prompt_ids(prompt_ids, self.model.config.vocab_size)
        self._check_lengths(prompt_ids, [1] * len(prompt_ids))
        if hidden is not None:
            hidden.check_model(self.model.config)
        rows = []
        for start in range(0, len(prompt_ids), self.max_batch_size):
            prompts = prompt_ids[start:start + self.max_batch_size]
            cache, out = self._prefill(prompts, capacity=max(len(p) for p in prompts), router_probs=True,
                                       hidden_states=hidden is not None)
            rows.append(feature_row(out, prompts, hidden))
            if self.prefill_memo > 0:
                with self._memo_lock:
                    for row, ids in enumerate(prompts):
                        last = out.logits[row, len(ids) - 1:len(ids)]
                        self._memo[tuple(ids)] = (cache.select([row]), last)
                        self._memo.move_to_end(tuple(ids))
                    while len(self._memo) > self.prefill_memo:
                        self._memo.popitem(last=False)
        return torch.cat(rows)

    @torch.no_grad()
    def prompt_logprobs(self, prompt_ids: list[list[int]], top_logprobs: int = 0
                        ) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
        """Teacher-forced log-probabilities of each prompt's tokens (what `echo` with `logprobs` returns).

        Args:
            prompt_ids: the prompts.
            top_logprobs: also the this many most likely (token id, log p) at each position (0 to 20).

        Returns:
            Per prompt: log p of tokens 1..n-1, each under the model given the
            tokens before it (the first token has no context, so none), and the
            most likely alternatives at those positions, most likely first.
        """
        if not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be an integer in [0, 20], got {top_logprobs!r}")
        check_prompt_ids(prompt_ids, self.model.config.vocab_size)
        self._check_lengths(prompt_ids, [0] * len(prompt_ids))
        results = []
        for start in range(0, len(prompt_ids), self.max_batch_size):
            prompts = prompt_ids[start:start + self.max_batch_size]
            _, out = self._prefill(prompts, capacity=max(len(p) for p in prompts))
            for row, ids in enumerate(prompts):
                logits_SV = out.logits[row, :len(ids) - 1]
                logp_SV = torch.log_softmax(logits_SV.to(torch.promote_types(logits_SV.dtype, torch.float32)), -1)
                targets = torch.tensor(ids[1:], dtype=torch.int64, device=logp_SV.device)
                logprobs = logp_SV.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
                top = [[] for _ in logprobs]
                if top_logprobs and logprobs:
                    values_SK, ids_SK = logp_SV.topk(top_logprobs, dim=-1)
                    top = [list(zip(i, v)) for i, v in zip(ids_SK.tolist(), values_SK.tolist())]
                results.append((logprobs, top))
        return results

    # ---- internals ---------------------------------------------------------------------

    def _requests(self, prompt_ids: list[list[int]], params: list[SamplingParams], *,
                  stream: bool) -> list[_Request]:
        if not isinstance(params, (list, tuple)) or len(params) != len(prompt_ids):
            raise ValueError(f"params: one SamplingParams per prompt is needed, got "
                             f"{len(params) if isinstance(params, (list, tuple)) else type(params).__name__} "
                             f"for {len(prompt_ids)} prompts")
        if not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError("params: every entry must be a SamplingParams")
        if not prompt_ids:
            return []
        check_prompt_ids(prompt_ids, self.model.config.vocab_size)
        for index, p in enumerate(params):
            unknown = [token for token, _ in p.logit_bias if token >= self.model.config.vocab_size]
            if unknown:
                raise ValueError(f"logit_bias: token ids {unknown} of request {index} are not in the "
                                 f"vocabulary of {self.model.config.vocab_size} tokens")
        self._check_lengths(prompt_ids, [p.max_tokens for p in params])
        return [_Request(ids, p, self.device, self.decode, stream) for ids, p in zip(prompt_ids, params)]

    def _check_lengths(self, prompt_ids: list[list[int]], max_tokens: list[int]) -> None:
        max_seq_len = self.model.config.max_seq_len
        for index, (ids, new) in enumerate(zip(prompt_ids, max_tokens)):
            if len(ids) > max_seq_len - new:
                raise ValueError(f"prompt: prompt {index} has {len(ids)} tokens, and with max_tokens={new} the "
                                 f"model's max_seq_len of {max_seq_len} leaves room for at most "
                                 f"{max(0, max_seq_len - new)} prompt tokens")

    @torch.no_grad()
    def _prefill(self, prompts: list[list[int]], *, capacity: int, router_probs: bool = False,
                 hidden_states: bool = False):
        cache = KVCache(self.model.config.num_layers, len(prompts), capacity)
        out = self.model(right_pad(prompts, self.device), cache=cache, input_lengths=[len(p) for p in prompts],
                         return_router_probs=router_probs, return_hidden_states=hidden_states)
        return cache, out

    @torch.no_grad()
    def _admit(self, new: list[_Request]) -> tuple[Optional[KVCache], list[_Request]]:
        """Prefills `new` (or takes their memoised prefill), draws their first tokens.

        Returns:
            The cache of those still running and those requests, in its row order.
        """
        memoised, fresh = [], []
        with self._memo_lock:
            for request in new:
                entry = self._memo.pop(tuple(request.prompt_ids), None)
                if entry is None:
                    fresh.append(request)
                else:
                    memoised.append((request, entry))
        caches = [cache for _, (cache, _) in memoised]
        last_logits = [logits for _, (_, logits) in memoised]
        ordered = [request for request, _ in memoised] + fresh
        if fresh:
            prompts = [r.prompt_ids for r in fresh]
            capacity = max(len(r.prompt_ids) + r.params.max_tokens - 1 for r in fresh)
            cache, out = self._prefill(prompts, capacity=capacity)
            rows = torch.arange(len(fresh), device=self.device)
            ends = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
            caches.append(cache)
            last_logits.append(out.logits[rows, ends])
        self._choose(ordered, torch.cat(last_logits))
        keep = [i for i, r in enumerate(ordered) if r.finish_reason is None]
        if not keep:
            return None, []
        cache = caches[0] if len(caches) == 1 else KVCache.concat(caches)
        if len(keep) < len(ordered):
            cache = cache.select(keep)
        return cache, [ordered[i] for i in keep]

    @torch.no_grad()
    def _decode_step(self, running: list[_Request], cache: KVCache) -> None:
        last_ids = torch.tensor([[r.token_ids[-1]] for r in running], dtype=torch.int64, device=self.device)
        if self._decoder is not None:
            out = self._decoder(last_ids, cache)
            self._choose(running, out.logits_BV, out.logprobs_BV, out.greedy_B)
        else:
            self._choose(running, self.model(last_ids, cache=cache).logits[:, -1])

    def _choose(self, requests: list[_Request], logits_BV: torch.Tensor, logp_BV: Optional[torch.Tensor] = None,
                greedy_B: Optional[torch.Tensor] = None) -> None:
        """Draws each request's next token from its row (greedy or its own generator). `logp_BV` and `greedy_B`:
        the log-softmax and argmax of the logits when the caller has them (`CompiledDecoder`)."""
        if logp_BV is None:
            logp_BV = torch.log_softmax(logits_BV.to(torch.promote_types(logits_BV.dtype, torch.float32)), dim=-1)
        tokens_B = logits_BV.argmax(dim=-1) if greedy_B is None else greedy_B
        for row, request in enumerate(requests):
            params = request.params
            logits_V = request.adjust(logits_BV[row]) if params.changes_logits else logits_BV[row]
            if params.temperature > 0:
                probs_V = sampling_distribution(logits_V, params.temperature, params.top_p)
                tokens_B[row] = sample_from(probs_V, request.rng)
            elif params.changes_logits:
                tokens_B[row] = logits_V.argmax()
        logprobs_B = logp_BV.gather(1, tokens_B.unsqueeze(1)).squeeze(1)
        k = max(r.params.top_logprobs for r in requests)
        top = None
        if k:
            values_BK, ids_BK = logp_BV.topk(k, dim=-1)
            top = [list(zip(i, v)) for i, v in zip(ids_BK.tolist(), values_BK.tolist())]
        for row, (request, token, logprob) in enumerate(zip(requests, tokens_B.tolist(), logprobs_B.tolist())):
            wanted = request.params.top_logprobs
            request.add(token, logprob, None if request.params.ignore_eos else self.eos_id,
                        top[row][:wanted] if wanted else None)

    def _run(self, requests: Union[list[_Request], "deque[_Request]"]) -> Iterator[None]:
        """Decodes `requests` to the end (see the module NOTE); yields after every step. Given a deque, requests
        appended to it while this runs join at the next admission (`LiveBatch`)."""
        waiting = requests if isinstance(requests, deque) else deque(requests)
        running: list[_Request] = []
        cache: Optional[KVCache] = None
        while waiting or running:
            if waiting and len(running) < self.max_batch_size:
                new = [waiting.popleft() for _ in range(min(len(waiting), self.max_batch_size - len(running)))]
                new_cache, admitted = self._admit(new)
                if admitted:
                    cache = new_cache if cache is None else KVCache.concat([cache, new_cache])
                    running += admitted
                yield
                continue
            self._decode_step(running, cache)
            keep = [i for i, r in enumerate(running) if r.finish_reason is None]
            if len(keep) < len(running):
                running = [running[i] for i in keep]
                cache = cache.select(keep) if keep else None
            yield


class LiveBatch:
    """Streams that join one continuous batch while it decodes: one decode step serves every live stream.

    `add` checks and queues a request; `step` runs one step of the decoding loop
    (an admission of the queued requests, or a decode step of the running ones;
    see the module NOTE), after which each request's `pending` text and, once
    `finish_reason` is set, its `completion()` are ready. `add` and `cancel` may
    be called between steps from another thread than `step`'s (the queue is a
    deque); `step` runs on one thread at a time.
    """

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.waiting: deque[_Request] = deque()
        self._steps: Optional[Iterator[None]] = None

    def add(self, prompt_ids: list[int], params: SamplingParams) -> _Request:
        """Queues one request (ValueError now for a bad one, as `Generator.stream_ids`)."""
        [request] = self.generator._requests([prompt_ids], [params], stream=True)
        self.waiting.append(request)
        return request

    def cancel(self, request: _Request) -> None:
        """Drops a request (its client left): at once if still queued, else after the next step."""
        try:
            self.waiting.remove(request)
        except ValueError:
            pass
        if request.finish_reason is None:
            request.finish_reason = "cancelled"

    def step(self) -> bool:
        """One step of the loop; False when no request is left (queued or running)."""
        if self._steps is None:
            if not self.waiting:
                return False
            self._steps = self.generator._run(self.waiting)
        try:
            next(self._steps)
            return True
        except StopIteration:
            self._steps = None
            return bool(self.waiting)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["Completion", "EOS_TOKEN", "Generator", "SamplingParams", "load_tokenizer", "sample_from",
           "sampling_distribution"]
