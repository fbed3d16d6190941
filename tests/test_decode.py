"""The compiled decoding step (moe/decode.py) against the eager one, and `Generator(compile_decode=True)`."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from moe import ModelConfig, MoETransformer
from moe.decode import CompiledDecoder
from moe.generate import Generator, SamplingParams
from moe.model import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")

# A named tiny size whose one model covers every branch of the step: a dense first layer, a sliding window
# shorter than the sequences, grouped-query attention, top-2 routed experts plus a shared expert.
TINY = dict(vocab_size=300, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=48,
            rope_theta=100.0, first_k_dense=1, sliding_window=4, router=dict(top_k=2),
            experts=dict(num_experts=4, hidden_size=16, backend="loop", num_shared_experts=1))
PROMPTS = [[5, 9, 3, 7, 1], [11, 2], [4, 4, 8, 15, 16, 23, 42]]


@pytest.fixture(scope="module")
def model() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(**TINY)).double().eval()


# `make test` traces the step with the "aot_eager" backend: Dynamo's graph (whole: fullgraph), its dynamic sizes
# and recompilations, the functionalized in-place cache writes and the opaque experts operator, run by eager
# kernels (seconds). "inductor", the default backend users get, also generates and compiles C++ kernels: 30-45 s
# for this module's two graphs on a cold cache on 2 cores, so it runs in `make test-slow` (as does the tier's).
BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.extended)]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def decoder(model, backend) -> CompiledDecoder:
    return CompiledDecoder(model, backend=backend)


def prefill(model: MoETransformer, prompts: list[list[int]], capacity: int) -> tuple[KVCache, torch.Tensor]:
    cache = KVCache(model.config.num_layers, len(prompts), capacity=capacity)
    padded = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for row, ids in enumerate(prompts):
        padded[row, :len(ids)] = torch.tensor(ids)
    out = model(padded, cache=cache, input_lengths=[len(p) for p in prompts])
    return cache, out.logits[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])]


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


@torch.no_grad()
def test_compiled_step_matches_eager_step(model, decoder) -> None:
    """Rows at different positions, past the sliding window, while the cache grows (8 slots at the prefill,
    then 16 and 32) and while rows leave (3 -> 2 -> 1): the logits equal the eager step's (float64, to
    rounding), so do their log-softmax, argmax and the cache's keys and values. The batch and the capacity
    are dynamic: one graph for every batch of 2+ rows at any capacity, one more for a single row."""
    eager_cache, eager_logits = prefill(model, PROMPTS, capacity=8)
    compiled_cache, _ = prefill(model, PROMPTS, capacity=8)
    before = graphs_compiled()
    capacities = set()
    for rows in (None, [2, 0], [1]):
        if rows is not None:
            eager_cache, compiled_cache = eager_cache.select(rows), compiled_cache.select(rows)
            eager_logits = eager_logits[rows]
        for _ in range(11 if rows is None else 3):
            tokens_B1 = eager_logits.argmax(-1, keepdim=True)
            compiled = decoder(tokens_B1, compiled_cache)
            eager_logits = model(tokens_B1, cache=eager_cache).logits[:, -1]
            torch.testing.assert_close(compiled.logits_BV, eager_logits, atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(compiled.logprobs_BV, torch.log_softmax(eager_logits, -1), atol=1e-12,
                                       rtol=1e-12)
            assert compiled.greedy_B.tolist() == eager_logits.argmax(-1).tolist()
            assert compiled_cache.lengths == eager_cache.lengths
            capacities.add(compiled_cache.capacity)
        if rows is None or len(rows) > 1:
            assert graphs_compiled() - before in (0, 1)  # 0: compiled already by the generator test
    assert capacities == {16, 32}
    for name in ("keys", "values"):
        for ours, theirs in zip(getattr(compiled_cache, name), getattr(eager_cache, name)):
            written = compiled_cache.lengths[0]
            torch.testing.assert_close(ours[:, :, :written], theirs[:, :, :written], atol=1e-12, rtol=1e-12)
    assert graphs_compiled() - before <= 2


def test_generator_compile_decode_gives_the_eager_completions(model, backend) -> None:
    """Greedy, seeded sampling, penalties and top_logprobs, with different max_tokens so the batch shrinks as
    requests finish, and more requests than fit in one batch (a new row joins a running one): the same tokens,
    log-probabilities and finish reasons as the eager generator."""
    from data_pipeline.tokenize import train_tokenizer

    tokenizer = train_tokenizer(["hello world, the cat sat on the mat. " * 3, "def f(x): return x + 1\n"],
                                vocab_size=TINY["vocab_size"], eos_token="<|endoftext|>")
    prompts = [*PROMPTS, [7], [3, 1, 4, 1, 5]]
    params = [SamplingParams(max_tokens=6, ignore_eos=True),
              SamplingParams(max_tokens=11, temperature=0.9, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=3, presence_penalty=1.0, frequency_penalty=0.5, top_logprobs=3),
              SamplingParams(max_tokens=9, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=1.0, top_p=0.8, seed=5, ignore_eos=True)]
    eager = Generator(model, tokenizer, max_batch_size=3).generate_ids(prompts, params)
    # Its own CompiledDecoder reuses the graphs the other test compiled (torch caches them per function).
    compiled = Generator(model, tokenizer, max_batch_size=3,
                         compile_decode={"backend": backend}).generate_ids(prompts, params)
    for got, expected in zip(compiled, eager):
        assert got.token_ids == expected.token_ids and got.finish_reason == expected.finish_reason
        torch.testing.assert_close(torch.tensor(got.token_logprobs), torch.tensor(expected.token_logprobs),
                                   atol=1e-10, rtol=1e-10)
        assert [[t for t, _ in top] for top in got.top_logprobs] == \
            [[t for t, _ in top] for top in expected.top_logprobs]
    assert sum(len(c.token_ids) for c in compiled) == 6 + 11 + 9 + 8 + len(compiled[2].token_ids)


def test_compiled_decoder_refuses_what_it_cannot_decode(model, decoder) -> None:
    cache, _ = prefill(model, PROMPTS, capacity=8)
    with pytest.raises(ValueError, match="one token per row"):
        decoder(torch.zeros(3, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="cache has 3 rows"):
        decoder(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="written by a forward pass"):
        decoder(torch.zeros(1, 1, dtype=torch.long), KVCache(model.config.num_layers, 1, capacity=4))
    full, _ = prefill(model, [[1] * TINY["max_seq_len"]], capacity=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        decoder(torch.zeros(1, 1, dtype=torch.long), full)
    assert full.lengths == [TINY["max_seq_len"]]  # nothing written
    with pytest.raises(ValueError, match="compile_decode must be a bool or a dict"):
        Generator(model, object(), compile_decode="inductor")
    sharded = MoETransformer(ModelConfig(**TINY))
    sharded.layers[1].ffn.dispatcher = object()  # stands for expert parallelism's all-to-all dispatcher
    with pytest.raises(ValueError, match="layer 1 dispatches with object"):
        CompiledDecoder(sharded)


@pytest.mark.extended
def test_serving_tier_compiles_its_steps_at_start_and_answers_like_the_eager_tier(tmp_path) -> None:
    """`tiers.<name>.compile_decode=true`: the tier (the Serve deployment class, built here without Serve: its
    `@serve.batch` methods need a replica, so its generator is called as they call it) compiles both of its
    graphs when it starts, so requests of one and of three prompts compile nothing more, and its answers are
    the eager tier's."""
    from data_pipeline.tokenize import train_tokenizer
    from serving.testing import make_tier
    from serving.tier import Tier

    tokenizer = train_tokenizer(["a mixture of experts routes tokens", "grouped matrix multiply"] * 10,
                                vocab_size=200, eos_token="<|endoftext|>")
    checkpoint = str(make_tier(tmp_path / "tier", tokenizer.to_str(), hidden=16, seed=4))
    eager = Tier("small", checkpoint)
    before = graphs_compiled()
    compiled = Tier("small", checkpoint, compile_decode=True)
    assert graphs_compiled() - before == 2
    prompts = [[5, 9, 3], [11], [4, 8, 15, 16]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (7, 4, 9)]
    for rows in (slice(0, 1), slice(0, 3)):
        ours = compiled.generator.generate_ids(prompts[rows], params[rows])
        theirs = eager.generator.generate_ids(prompts[rows], params[rows])
        assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
        assert [len(c.token_ids) for c in ours] == [7, 4, 9][rows]
        torch.testing.assert_close(torch.tensor([lp for c in ours for lp in c.token_logprobs]),
                                   torch.tensor([lp for c in theirs for lp in c.token_logprobs]), atol=1e-5,
                                   rtol=1e-5)
    assert graphs_compiled() - before == 2
