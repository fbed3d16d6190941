"""Generation: the KV cache against full recomputation, batching, sampling, stop strings, streaming."""

from __future__ import annotations

import math

import pytest
import torch

from moe import ModelConfig, MoETransformer
from moe.generate import (Completion, Generator, SamplingParams, load_tokenizer, sample_from,
                          sampling_distribution)
from moe.model import KVCache


pytestmark = pytest.mark.usefixtures("one_thread")

EOS = "<|endoftext|>"
TEXTS = ["hello world, the cat sat on the mat. " * 3, "def f(x): return x + 1\n" * 2,
         "stop here and there; the end of the line.\n", "héllo wörld ünïcode"]
VOCAB = 300

# Named tiny sizes for tests (never the real ones); the cases cover GQA, a
# sliding window shorter than the sequences, top-2 MoE layers after a dense
# first layer, and a capacity factor (which generation ignores).
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=48,
            rope_theta=100.0, experts=dict(num_experts=4, hidden_size=16, backend="loop"), router=dict(top_k=2))
CASES = {
    "full": dict(),
    "window": dict(sliding_window=3),
    "dense_first_window_mha": dict(first_k_dense=1, sliding_window=4, num_kv_heads=4),
    "capacity_sigmoid": dict(router=dict(top_k=2, capacity_factor=0.5, score_func="sigmoid")),
}


def tiny_model(seed: int = 0, **overrides) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig(**{**TINY, **overrides})).double().eval()


@pytest.fixture(scope="module")
def tokenizer():
    from data_pipeline.tokenize import train_tokenizer

    return train_tokenizer(TEXTS, vocab_size=VOCAB, eos_token=EOS)


def full_logits(model: MoETransformer, ids: list[int]) -> torch.Tensor:
    """Reference: the whole sequence recomputed without a cache (dropless, like generation)."""
    return model(torch.tensor([ids]), ignore_capacity=True).logits[0, -1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_steps_match_full_recompute(case: str) -> None:
    """Right-padded batched prefill, then greedy steps: every row's logits equal recomputing its sequence."""
    model = tiny_model(**CASES[case])
    prompts = [[5, 9, 3, 7, 1], [11, 2], [4, 4, 8, 15, 16, 23, 42]]
    cache = KVCache(model.config.num_layers, len(prompts), capacity=4)  # grows while decoding
    padded = torch.zeros(3, 7, dtype=torch.long)
    for row, ids in enumerate(prompts):
        padded[row, :len(ids)] = torch.tensor(ids)
    with torch.no_grad():
        out = model(padded, cache=cache, input_lengths=[len(p) for p in prompts])
        logits = out.logits[torch.arange(3), torch.tensor([len(p) - 1 for p in prompts])]
        sequences = [list(p) for p in prompts]
        for _ in range(9):  # 7 + 9 tokens: well past the sliding window
            for row, seq in enumerate(sequences):
                torch.testing.assert_close(logits[row], full_logits(model, seq), atol=1e-10, rtol=1e-10)
            tokens = logits.argmax(-1).tolist()
            for seq, token in zip(sequences, tokens):
                seq.append(token)
            logits = model(torch.tensor(tokens).unsqueeze(1), cache=cache).logits[:, -1]
    assert cache.lengths == [len(s) for s in sequences]
    # A finished row leaves: the others continue unchanged.
    kept = cache.select([2, 0])
    with torch.no_grad():
        step = model(torch.tensor([[1], [2]]), cache=kept).logits[:, -1]
    torch.testing.assert_close(step[0], full_logits(model, sequences[2] + [1]), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(step[1], full_logits(model, sequences[0] + [2]), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", ["full", "window"])
def test_rows_at_one_position_decode_without_a_mask_as_recompute(case: str) -> None:
    """Rows of equal length decode one token each with no attention mask (every slot read is visible; the
    sliding window is left out by the slots read) and one slice written to the cache: the logits still equal
    recomputing each sequence, past the window, with the grouped_mm experts' CPU inference path."""
    model = tiny_model(**CASES[case], experts=dict(num_experts=4, hidden_size=16, backend="grouped_mm")).float()
    masks = []
    for block in model.layers:
        block.attn.register_forward_pre_hook(lambda module, args: masks.append(args[2]))
    sequences = [[5, 9, 3, 7], [11, 2, 6, 1], [4, 8, 15, 16]]
    cache = KVCache(model.config.num_layers, len(sequences), capacity=2)
    with torch.no_grad():
        logits = model(torch.tensor(sequences), cache=cache).logits[:, -1]
        for _ in range(8):  # 4 + 8 tokens: past the window of 3
            for row, seq in enumerate(sequences):
                torch.testing.assert_close(logits[row], full_logits(model, seq), atol=1e-5, rtol=1e-5)
            tokens = logits.argmax(-1).tolist()
            for seq, token in zip(sequences, tokens):
                seq.append(token)
            masks.clear()
            logits = model(torch.tensor(tokens).unsqueeze(1), cache=cache).logits[:, -1]
            assert masks == [None] * model.config.num_layers
    assert cache.lengths == [12] * 3


def reference_greedy(model: MoETransformer, prompt: list[int], max_tokens: int,
                     eos_id: int) -> tuple[list[int], list[float]]:
    ids, tokens, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            logp = torch.log_softmax(full_logits(model, ids), -1)
            token = int(logp.argmax())
            if token == eos_id:
                break
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids.append(token)
    return tokens, logprobs


@pytest.mark.parametrize("case", ["window", "dense_first_window_mha"])
def test_generator_greedy_matches_recompute(tokenizer, case: str) -> None:
    model = tiny_model(**CASES[case])
    generator = Generator(model, tokenizer)
    prompts = [[5, 9, 3, 7, 1], [11, 2], [4]]
    completions = generator.generate_ids(prompts, [SamplingParams(max_tokens=12)] * 3)
    for prompt, completion in zip(prompts, completions):
        tokens, logprobs = reference_greedy(model, prompt, 12, generator.eos_id)
        assert completion.token_ids == tokens
        torch.testing.assert_close(torch.tensor(completion.token_logprobs, dtype=torch.float64),
                                   torch.tensor(logprobs, dtype=torch.float64), atol=1e-10, rtol=1e-10)
        assert completion.finish_reason == ("length" if len(tokens) == 12 else "stop")
        assert completion.prompt_token_ids == prompt
        assert completion.text == tokenizer.decode(tokens)


def reference_adjusted_greedy(model: MoETransformer, prompt: list[int], max_tokens: int, eos_id: int,
                              presence: float, frequency: float, bias: dict[int, float], top: int):
    """OpenAI's definition, token by token: logit[j] -= c[j] * frequency + (c[j] > 0) * presence, plus the
    bias; greedy on that; the log-probabilities reported are the model's own, and its `top` most likely."""
    ids, tokens, logprobs, tops = list(prompt), [], [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = full_logits(model, ids).clone()
            logp = torch.log_softmax(logits, -1)
            for j in set(tokens):
                count = tokens.count(j)
                logits[j] -= count * frequency + presence
            for j, b in bias.items():
                logits[j] += b
            token = int(logits.argmax())
            if token == eos_id:
                break
            tokens.append(token)
            logprobs.append(float(logp[token]))
            values, order = logp.sort(descending=True)
            tops.append(list(zip(order[:top].tolist(), values[:top].tolist())))
            ids.append(token)
    return tokens, logprobs, tops


def test_penalties_bias_and_top_logprobs_match_the_definition(tokenizer) -> None:
    """Presence/frequency penalties and logit_bias change the greedy choice as OpenAI defines them, per request
    inside one batch; top_logprobs are the model's own most likely tokens at each step."""
    model = tiny_model(**CASES["window"])
    generator = Generator(model, tokenizer, max_batch_size=4)
    prompts = [[5, 9, 3], [11, 2], [4, 4, 8], [7]]
    plain = generator.generate_ids([prompts[0]], [SamplingParams(max_tokens=12)])[0].token_ids
    banned = plain[0]
    settings = [dict(presence=0.0, frequency=2.0, bias={}, top=0), dict(presence=2.0, frequency=0.0, bias={}, top=3),
                dict(presence=0.5, frequency=-0.5, bias={banned: -100.0, 17: 1.5}, top=5),
                dict(presence=0.0, frequency=0.0, bias={}, top=2)]
    params = [SamplingParams(max_tokens=12, presence_penalty=c["presence"], frequency_penalty=c["frequency"],
                             logit_bias=c["bias"], top_logprobs=c["top"]) for c in settings]
    for prompt, setting, got in zip(prompts, settings, generator.generate_ids(prompts, params)):
        tokens, logprobs, tops = reference_adjusted_greedy(model, prompt, 12, generator.eos_id, **setting)
        assert got.token_ids == tokens
        torch.testing.assert_close(torch.tensor(got.token_logprobs, dtype=torch.float64),
                                   torch.tensor(logprobs, dtype=torch.float64), atol=1e-10, rtol=1e-10)
        assert [[i for i, _ in t] for t in got.top_logprobs] == [[i for i, _ in t] for t in tops]
        for mine, ref in zip(got.top_logprobs, tops):
            assert [v for _, v in mine] == pytest.approx([v for _, v in ref], abs=1e-10)
    repeated, penalised = generator.generate_ids([prompts[0]] * 2, [
        SamplingParams(max_tokens=12, logit_bias={17: 10.0}),
        SamplingParams(max_tokens=12, logit_bias={17: 10.0}, frequency_penalty=2.0)])
    assert repeated.token_ids == [17] * 12 and 0 < penalised.token_ids.count(17) < 12, "the penalty grows per use"
    [forced] = generator.generate_ids([prompts[1]], [SamplingParams(max_tokens=5, logit_bias={17: 100.0})])
    assert forced.token_ids == [17] * 5, "a bias of 100 forces the token"
    [avoided] = generator.generate_ids([prompts[0]], [SamplingParams(max_tokens=12, logit_bias={banned: -100})])
    assert banned not in avoided.token_ids


def test_prompt_logprobs_match_a_recompute_of_every_prefix(tokenizer) -> None:
    """`echo`'s scores: log p of each prompt token given the tokens before it, batched and right-padded, against
    the model run on each prefix alone; the top alternatives are the model's most likely there."""
    model = tiny_model(**CASES["dense_first_window_mha"])
    prompts = [[5, 9, 3, 7, 1, 2], [11, 2], [4], [4, 4, 8, 15, 16, 23, 42]]
    scored = Generator(model, tokenizer, max_batch_size=3).prompt_logprobs(prompts, top_logprobs=3)
    for ids, (logprobs, top) in zip(prompts, scored):
        assert len(logprobs) == len(top) == len(ids) - 1
        for k in range(1, len(ids)):
            logp = torch.log_softmax(full_logits(model, ids[:k]), -1)
            assert logprobs[k - 1] == pytest.approx(float(logp[ids[k]]), abs=1e-10)
            values, order = logp.sort(descending=True)
            assert [i for i, _ in top[k - 1]] == order[:3].tolist()
            assert [v for _, v in top[k - 1]] == pytest.approx(values[:3].tolist(), abs=1e-10)
    with pytest.raises(ValueError, match="prompt 0 has 49 tokens"):
        Generator(model, tokenizer).prompt_logprobs([[1] * 49])


@pytest.mark.parametrize("kwargs,field", [(dict(presence_penalty=2.5), "presence_penalty"),
                                          (dict(frequency_penalty="1"), "frequency_penalty"),
                                          (dict(logit_bias={3: 101}), "logit_bias"),
                                          (dict(logit_bias={-1: 1}), "logit_bias"),
                                          (dict(top_logprobs=21), "top_logprobs")])
def test_bad_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_logit_bias_outside_the_vocabulary_is_refused(tokenizer) -> None:
    generator = Generator(tiny_model(), tokenizer)
    with pytest.raises(ValueError, match=r"logit_bias: token ids \[300\] of request 0"):
        generator.generate_ids([[5]], [SamplingParams(logit_bias={VOCAB: 1.0})])


def test_request_in_a_batch_equals_alone(tokenizer) -> None:
    """Greedy and seeded requests of different lengths and max_tokens, more than fit in one batch."""
    model = tiny_model(**CASES["window"])
    prompts = [[5, 9, 3, 7, 1], [11, 2], [4, 4, 8, 15, 16, 23, 42], [7], [3, 1, 4, 1, 5]]
    params = [SamplingParams(max_tokens=6), SamplingParams(max_tokens=11, temperature=0.9, seed=3),
              SamplingParams(max_tokens=3, temperature=1.3, top_p=0.8, seed=4), SamplingParams(max_tokens=9),
              SamplingParams(max_tokens=8, temperature=1.0, seed=5)]
    batched = Generator(model, tokenizer, max_batch_size=3).generate_ids(prompts, params)
    alone = Generator(model, tokenizer, max_batch_size=1)
    for prompt, p, got in zip(prompts, params, batched):
        [expected] = alone.generate_ids([prompt], [p])
        assert got.token_ids == expected.token_ids and got.finish_reason == expected.finish_reason
        torch.testing.assert_close(torch.tensor(got.token_logprobs), torch.tensor(expected.token_logprobs),
                                   atol=1e-10, rtol=1e-10)
    assert len(batched[1].token_ids) > 0 and batched[1].token_ids != batched[0].token_ids


def test_seed_reproducibility(tokenizer) -> None:
    generator = Generator(tiny_model(), tokenizer)
    params = [SamplingParams(max_tokens=10, temperature=1.5, seed=s) for s in (1, 1, 2)]
    first, same, other = generator.generate_ids([[5, 9]] * 3, params)
    assert first.token_ids == same.token_ids and first.token_ids != other.token_ids


def reference_nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sorted-cumsum reference, one token at a time."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = [], 0.0
    for token in order:
        kept.append(token)
        mass += float(probs[token])
        if mass >= top_p:
            break
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (2.0, 0.5), (1.0, 1e-6)])
def test_sampling_distribution_and_draws(temperature: float, top_p: float) -> None:
    torch.manual_seed(0)
    for _ in range(5):
        logits = torch.randn(50) * 2
        torch.testing.assert_close(sampling_distribution(logits, temperature, top_p),
                                   reference_nucleus(logits, temperature, top_p), atol=1e-12, rtol=1e-12)
    probs = sampling_distribution(torch.randn(6) * 1.5, temperature, top_p)
    generator = torch.Generator().manual_seed(0)
    draws = 20000
    counts = torch.bincount(torch.stack([sample_from(probs, generator) for _ in range(draws)]), minlength=6)
    assert counts[probs == 0].sum() == 0, "a token outside the nucleus was drawn"
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert ((counts / draws - probs).abs() <= 5 * sigma + 1e-9).all(), (counts / draws, probs)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-8])
def test_tiny_temperature_is_greedy(temperature: float) -> None:
    """The limit temperature -> 0 is the greedy one-hot (found by fuzzing the server: NaN before)."""
    logits = torch.tensor([0.5, 3.0, -1.0, 2.999])
    probs = sampling_distribution(logits, temperature, 1.0)
    torch.testing.assert_close(probs, torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert int(sample_from(probs, torch.Generator().manual_seed(0))) == 1
    tied = sampling_distribution(torch.tensor([1.0, 1.0, 0.0]), temperature, 1.0)
    torch.testing.assert_close(tied, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))


# ---- text: a scripted model ------------------------------------------------------------------

def scripted_model(script: list[int], last: int, vocab: int = VOCAB) -> MoETransformer:
    """A real MoETransformer whose greedy continuation of script[i] is script[i + 1] (and `last` after the end).

    Attention and feed-forward outputs are zeroed, so the logits are a function
    of the current token alone: lm_head(norm(embedding)).
    """
    assert len(set(script)) == len(script), "the script's tokens must be distinct"
    config = ModelConfig(**{**TINY, "vocab_size": vocab, "hidden_size": 64, "first_k_dense": 1})
    model = MoETransformer(config).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "w2.weight", "w2_EFD")):
                param.zero_()
        model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for i, token in enumerate(script):
            model.embed_tokens.weight[token, i] = 1.0
            model.lm_head.weight[script[i + 1] if i + 1 < len(script) else last, i] = 2.0
    return model


TEXT = "x€ the mat; stop.\nBye"  # distinct tokens, "€" split over three byte tokens


@pytest.fixture(scope="module")
def script(tokenizer):
    ids = tokenizer.encode("A" + TEXT).ids
    euro = tokenizer.encode("€").ids
    assert len(euro) >= 2, "the test needs a character split over several byte tokens"
    return ids


def expected_cut(tokenizer, generated: list[int], stop: str) -> tuple[str, list[int]]:
    text = tokenizer.decode(generated)
    cut = text[:text.find(stop)]
    n = max(n for n in range(len(generated) + 1) if cut.startswith(tokenizer.decode(generated[:n])))
    return cut, generated[:n]


@pytest.mark.parametrize("stop", ["e mat; s", "e", "op.", "€ th", ".\nB"])
def test_stop_strings_cut_text_and_tokens(tokenizer, script, stop: str) -> None:
    generator = Generator(scripted_model(script, last=generator_eos(tokenizer)), tokenizer)
    [completion] = generator.generate_ids([script[:1]], [SamplingParams(max_tokens=40, stop=(stop, "never"))])
    text, tokens = expected_cut(tokenizer, script[1:], stop)
    assert completion.text == text and stop not in completion.text
    assert completion.token_ids == tokens and len(completion.token_logprobs) == len(tokens)
    assert completion.finish_reason == "stop"
    # A stop string spanning tokens: none of the tokens it touches is kept.
    assert TEXT.startswith(text)


def generator_eos(tokenizer) -> int:
    return tokenizer.token_to_id(EOS)


def test_finish_reasons_and_confidence(tokenizer, script) -> None:
    eos = generator_eos(tokenizer)
    generator = Generator(scripted_model(script, last=eos), tokenizer)
    by_eos, by_length = generator.generate_ids([script[:1], script[:1]], [SamplingParams(max_tokens=40),
                                                                          SamplingParams(max_tokens=3)])
    assert by_eos.finish_reason == "stop" and by_eos.token_ids == script[1:] and by_eos.text == TEXT
    assert eos not in by_eos.token_ids
    assert by_length.finish_reason == "length" and by_length.token_ids == script[1:4]
    probs = [math.exp(lp) for lp in by_eos.token_logprobs]
    assert by_eos.mean_confidence == pytest.approx(sum(probs) / len(probs)) and 0 < by_eos.mean_confidence < 1
    assert Completion([1], [], "", "stop", []).mean_confidence == 1.0
    # ignore_eos (vLLM's extension): the EOS token is generated like any other, up to max_tokens.
    past = generator.generate_ids([script[:1]], [SamplingParams(max_tokens=len(script) + 2, ignore_eos=True)])[0]
    assert past.finish_reason == "length" and len(past.token_ids) == len(script) + 2
    assert past.token_ids[:len(script)] == script[1:] + [eos]


@pytest.mark.parametrize("stop", [(), ("stop!",), ("mat; st",), ("€",)])
def test_stream_deltas_concatenate_to_the_text(tokenizer, script, stop) -> None:
    generator = Generator(scripted_model(script, last=generator_eos(tokenizer)), tokenizer)
    events = list(generator.stream_ids(script[:1], SamplingParams(max_tokens=40, stop=stop)))
    deltas = [d for d, c in events[:-1]]
    final_delta, completion = events[-1]
    assert final_delta == "" and all(c is None for _, c in events[:-1]) and all(deltas)
    assert "".join(deltas) == completion.text
    assert all("\ufffd" not in d for d in deltas), "an incomplete UTF-8 character was streamed"
    for s in stop:
        assert s not in "".join(deltas)
    expected = TEXT if not stop or stop[0] not in TEXT else TEXT[:TEXT.find(stop[0])]
    assert completion.text == expected
    assert len(deltas) >= min(4, len(expected)), "text arrives token by token"
    # "stop" is held back while it may begin "stop!", then released: the text goes on past it.
    prompt_text = tokenizer.decode(script[:1])
    assert list(generator.stream(prompt_text, SamplingParams(max_tokens=40, stop=stop)))[-1][1].text == expected


def test_prefill_signals_are_reused_by_generation(tokenizer) -> None:
    from moe.difficulty import HiddenFeatures, prompt_signals

    model = tiny_model(**CASES["dense_first_window_mha"])
    generator = Generator(model, tokenizer, max_batch_size=2)
    prompts = [[11, 2], [5, 9, 3, 7, 1], [4, 4, 8]]
    signals = generator.prefill_signals(prompts)
    torch.testing.assert_close(signals, prompt_signals(model, prompts), atol=1e-10, rtol=1e-10)
    # A probe router's features: the same pooled hidden states as the plain forward pass (KV-cached prefill).
    hidden = HiddenFeatures((0, model.config.num_layers - 1), ("last", "mean"), model.config.hidden_size)
    torch.testing.assert_close(generator.prefill_signals(prompts, hidden=hidden),
                               prompt_signals(model, prompts, hidden=hidden), atol=1e-10, rtol=1e-10)
    assert len(generator._memo) == 2  # the last max_batch_size prefills are kept
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    params = [SamplingParams(max_tokens=5, temperature=1.0, seed=i) for i in range(3)]
    reused = generator.generate_ids(prompts, params)
    hook.remove()
    assert max(calls) == 2, "only the evicted [11, 2] is prefilled again"
    fresh = Generator(model, tokenizer, max_batch_size=2, prefill_memo=0).generate_ids(prompts, params)
    for a, b in zip(reused, fresh):
        assert a.token_ids == b.token_ids


def test_bad_params_name_the_field(tokenizer) -> None:
    for kwargs, field in [(dict(max_tokens=0), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
                          (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
                          (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(seed=-1), "seed"),
                          (dict(seed=1.5), "seed"), (dict(stop=("",)), "stop"), (dict(stop=(3,)), "stop")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    generator = Generator(tiny_model(), tokenizer)
    with pytest.raises(ValueError, match=r"prompt: prompt 1 has 45 tokens.*max_tokens=4.*48.*44"):
        generator.generate_ids([[1], [2] * 45], [SamplingParams(max_tokens=4)] * 2)
    with pytest.raises(ValueError, match="prompt"):
        generator.generate_ids([[]], [SamplingParams()])
    with pytest.raises(ValueError, match="prompt"):
        generator.generate_ids([[VOCAB]], [SamplingParams()])
    with pytest.raises(ValueError, match="params"):
        generator.generate_ids([[1], [2]], [SamplingParams()])
    with pytest.raises(ValueError, match="prompt"):
        generator.stream_ids([2] * 48, SamplingParams())  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="max_batch_size"):
        Generator(tiny_model(), tokenizer, max_batch_size=0)
    assert generator.generate_ids([], []) == []


def test_load_tokenizer(tmp_path, tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("hello world").ids == tokenizer.encode("hello world").ids
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_generation_modules_import_only_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, moe.generate, moe.difficulty; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'hydra', 'tokenizers', 'pyarrow', 'data_pipeline', 'omegaconf')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_live_batch_streams_equal_each_request_alone(tokenizer) -> None:
    """Streams that join a running batch at different steps (LiveBatch): each one's deltas concatenate to the
    same completion as the request decoded alone; a cancelled stream leaves the others unchanged."""
    from moe.generate import LiveBatch

    generator = Generator(tiny_model(seed=3), tokenizer, max_batch_size=3)
    prompts = [generator.encode(t) for t in ("the router", "experts of a mixture", "tokens", "a model routes")]
    params = [SamplingParams(max_tokens=6), SamplingParams(max_tokens=9, temperature=0.8, seed=5),
              SamplingParams(max_tokens=4, stop=("s",)), SamplingParams(max_tokens=7)]
    alone = [generator.generate_ids([p], [q])[0] for p, q in zip(prompts, params)]
    batch = LiveBatch(generator)
    live, texts = [], []
    cancelled = batch.add(prompts[0], SamplingParams(max_tokens=20))
    for k, (prompt, param) in enumerate(zip(prompts, params)):
        live.append(batch.add(prompt, param))
        texts.append("")
        for _ in range(k + 1):  # the next request joins while these decode
            batch.step()
            for i, request in enumerate(live):
                texts[i], request.pending = texts[i] + request.pending, ""
        if k == 1:
            batch.cancel(cancelled)
    while batch.step():
        for i, request in enumerate(live):
            texts[i], request.pending = texts[i] + request.pending, ""
    for i, request in enumerate(live):
        texts[i] += request.pending
        completion = request.completion()
        assert completion.token_ids == alone[i].token_ids and completion.text == alone[i].text == texts[i]
        assert completion.finish_reason == alone[i].finish_reason
        assert completion.token_logprobs == pytest.approx(alone[i].token_logprobs, abs=1e-5)
    assert cancelled.finish_reason == "cancelled" and not batch.step()
    with pytest.raises(ValueError, match="prompt"):
        batch.add([], SamplingParams())
