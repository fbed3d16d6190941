"""Expert backends and the MoE layer against simple float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe import ModelConfig
from moe.experts import EXPERT_BACKENDS, GroupedExperts
from moe.layer import FeedForward, MoELayer


def available_backends() -> list[str]:
    backends = ["loop", "grouped_mm"]
    try:
        GroupedExperts(2, 8, 8, "megablocks")
        backends.append("megablocks")
    except RuntimeError:
        pass  # needs CUDA and the optional package: covered by test_megablocks_error_names_reason
    return backends


def random_counts(num_experts: int, num_rows: int, generator: torch.Generator, zero_experts: int) -> torch.Tensor:
    counts = torch.zeros(num_experts, dtype=torch.int64)
    live = torch.randperm(num_experts, generator=generator)[zero_experts:]
    picks = live[torch.randint(0, len(live), (num_rows,), generator=generator)]
    counts.index_add_(0, picks, torch.ones(num_rows, dtype=torch.int64))
    return counts


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("shape", [(37, 16, 24, 4, 1), (64, 32, 48, 8, 3), (5, 8, 16, 6, 4)])
def test_backend_matches_float64_loop(backend: str, shape: tuple[int, ...]) -> None:
    num_rows, hidden, expert_hidden, num_experts, zero_experts = shape
    gen = torch.Generator().manual_seed(sum(shape))
    counts = random_counts(num_experts, num_rows, gen, zero_experts)
    x = torch.randn(num_rows, hidden, generator=gen, dtype=torch.float64)
    weights = [torch.randn(num_experts, hidden, expert_hidden, generator=gen, dtype=torch.float64) / 4,
               torch.randn(num_experts, expert_hidden, hidden, generator=gen, dtype=torch.float64) / 4,
               torch.randn(num_experts, hidden, expert_hidden, generator=gen, dtype=torch.float64) / 4]
    grad_out = torch.randn(num_rows, hidden, generator=gen, dtype=torch.float64)

    def run(fn, dtype):
        inputs = [t.detach().to(dtype).clone().requires_grad_() for t in [x, *weights]]
        out = fn(inputs[0], counts, *inputs[1:])
        out.backward(grad_out.to(dtype))
        return out.double(), [t.grad.double() for t in inputs]

    ref_out, ref_grads = run(EXPERT_BACKENDS["loop"], torch.float64)
    # grouped_mm has no float64 kernel: it runs in float32 against the float64 reference.
    dtype = torch.float64 if backend == "loop" else torch.float32
    out, grads = run(EXPERT_BACKENDS[backend], dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, atol=tol, rtol=tol)
    empty = counts == 0
    assert empty.sum() >= zero_experts
    for grad in grads[1:]:
        assert torch.all(grad[empty] == 0), "an expert with no tokens must get a zero gradient"


def test_loop_reference_is_per_expert_swiglu() -> None:
    """The reference itself against a direct computation, row by row."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    w1, w3 = (torch.randn(3, 4, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    w2 = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    out = EXPERT_BACKENDS["loop"](x, counts, w1, w2, w3)
    experts_of_rows = [0, 0, 2, 2, 2]
    for row, e in enumerate(experts_of_rows):
        h = F.silu(x[row] @ w1[e]) * (x[row] @ w3[e])
        torch.testing.assert_close(out[row], h @ w2[e], atol=1e-12, rtol=0)


def test_grouped_mm_rejects_float64_by_name() -> None:
    experts = GroupedExperts(2, 8, 8, "grouped_mm").double()
    with pytest.raises(TypeError, match="grouped_mm.*loop"):
        experts(torch.randn(4, 8, dtype=torch.float64), torch.tensor([2, 2]))


def test_grouped_mm_backward_accepts_expanded_grad() -> None:
    experts = GroupedExperts(2, 8, 8, "grouped_mm")
    experts(torch.randn(4, 8), torch.tensor([1, 3])).sum().backward()
    assert experts.w1_EDF.grad is not None


def test_compiled_path_backward_copies_no_expert_weights() -> None:
    """The custom op that compiled blocks call (moe::grouped_mm): gradients equal F.grouped_mm's, and its backward
    never copies the expert weights (a transposed copy used to be made per layer and backward; issue 18, S10)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moe.experts import _grouped_mm_op

    torch.manual_seed(0)
    x_ND = torch.randn(10, 8, requires_grad=True)
    w_EDF = torch.randn(3, 8, 12, requires_grad=True)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)  # the middle expert gets no rows
    grad_NF = torch.randn(10, 12)
    expected = torch.autograd.grad(F.grouped_mm(x_ND, w_EDF, offs=offsets), (x_ND, w_EDF), grad_NF)

    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            copy = str(func.overloadpacket) in ("aten.clone", "aten.copy_", "aten._to_copy")
            if copy and out.numel() == w_EDF.numel():
                copies.append(str(func))
            return out

    out_NF = _grouped_mm_op(x_ND, w_EDF, offsets)
    with Copies():
        grads = torch.autograd.grad(out_NF, (x_ND, w_EDF), grad_NF)
    assert not copies, copies
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_megablocks_error_names_reason() -> None:
    if "megablocks" in available_backends():
        pytest.skip("megablocks is usable here")
    with pytest.raises(RuntimeError, match="megablocks"):
        GroupedExperts(2, 8, 8, "megablocks")


def tiny_moe_config(**overrides) -> ModelConfig:
    router = dict(top_k=2, aux_loss_coef=0.0)
    router.update(overrides.pop("router", {}))
    experts = dict(num_experts=4, hidden_size=16, backend="loop")
    experts.update(overrides.pop("experts", {}))
    return ModelConfig(vocab_size=32, hidden_size=8, num_layers=1, num_heads=2, max_seq_len=32,
                       router=router, experts=experts, **overrides)


def naive_moe(layer: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference: sum over chosen experts of gate * SwiGLU_e(x)."""
    routing = layer.router(x_BSD)
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    out = torch.zeros_like(x_TD)
    e_w1, e_w2, e_w3 = layer.experts.w1_EDF, layer.experts.w2_EFD, layer.experts.w3_EDF
    for t in range(x_TD.shape[0]):
        for slot in range(routing.topk_ids_TK.shape[1]):
            e = int(routing.topk_ids_TK[t, slot])
            if e < 0:
                continue
            h = F.silu(x_TD[t] @ e_w1[e]) * (x_TD[t] @ e_w3[e])
            out[t] += routing.topk_weights_TK[t, slot] * (h @ e_w2[e])
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x_TD)
    return out.view_as(x_BSD)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_moe_layer_matches_token_loop(backend: str, top_k: int, score_func: str) -> None:
    torch.manual_seed(top_k)
    config = tiny_moe_config(router=dict(top_k=top_k, score_func=score_func),
                             experts=dict(backend=backend, num_shared_experts=1))
    layer = MoELayer(config).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    expected = naive_moe(layer, x)
    if backend != "loop":
        layer = layer.float()
        x = x.float()
    out, _ = layer(x)
    tol = 1e-12 if backend == "loop" else 1e-5
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_moe_layer_gradients_match_token_loop() -> None:
    torch.manual_seed(3)
    layer = MoELayer(tiny_moe_config(router=dict(aux_loss_coef=0.01, z_loss_coef=0.001))).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 8, dtype=torch.float64)
    out, routing = layer(x)
    (out * grad).sum().add(routing.aux_loss).backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    ref_out = naive_moe(layer, x)
    (ref_out * grad).sum().add(layer.router(x).aux_loss).backward()
    want = [x.grad] + [p.grad for p in layer.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    assert layer.router.gate.weight.grad.abs().sum() > 0, "the router must receive gradient"


def test_single_expert_moe_equals_dense_ffn() -> None:
    torch.manual_seed(0)
    config = tiny_moe_config(router=dict(top_k=1), experts=dict(num_experts=1, backend="grouped_mm"))
    layer = MoELayer(config)
    dense = FeedForward(8, 16)
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.w1_EDF[0].T)
        dense.w3.weight.copy_(layer.experts.w3_EDF[0].T)
        dense.w2.weight.copy_(layer.experts.w2_EFD[0].T)
    x = torch.randn(3, 5, 8)
    out, _ = layer(x)
    torch.testing.assert_close(out, dense(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("router,expected", [(dict(), []), (dict(score_func="sigmoid", top_k=2), []),
                                             (dict(capacity_factor=0.5), ["aten._local_scalar_dense"])],
                         ids=["dropless", "dropless_sigmoid", "capacity"])
def test_host_syncs_of_a_moe_layer_forward_and_backward(router: dict, expected: list) -> None:
    """Issue 18, S1: on one device a dropless MoE layer never waits for the device (no value read to the host,
    no value-sized output), forward and backward; the capacity mode reads one number, the rows kept."""
    from dist_helpers import HostSyncCounter

    layer = MoELayer(tiny_moe_config(router=router, experts=dict(backend="grouped_mm")))
    x = torch.randn(2, 9, 8, requires_grad=True)
    with HostSyncCounter() as syncs:
        out, _ = layer(x)
        out.square().sum().backward()
    assert syncs.ops == expected and syncs.host_ints == 0


def test_dropless_equals_capacity_moe_when_nothing_dropped() -> None:
    torch.manual_seed(0)
    dropless = MoELayer(tiny_moe_config(experts=dict(backend="grouped_mm")))
    capacity = MoELayer(tiny_moe_config(router=dict(capacity_factor=4.0), experts=dict(backend="grouped_mm")))
    capacity.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 9, 8)
    out_a, route_a = dropless(x)
    out_b, route_b = capacity(x)
    assert route_b.stats["dropped_fraction"] == 0
    torch.testing.assert_close(out_a, out_b)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drops_match_reference(policy: str) -> None:
    torch.manual_seed(1)
    config = tiny_moe_config(router=dict(capacity_factor=0.5, drop_policy=policy))
    layer = MoELayer(config).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    with torch.no_grad():  # skew the router so that some experts overflow
        layer.router.gate.weight[0] += 2.0 * x.reshape(-1, 8).mean(0)
    routing = layer.router(x)
    # Reference: rebuild the kept set expert by expert.
    scores = torch.softmax(layer.router.gate(x.reshape(-1, 8)), -1)
    top_w, top_ids = torch.topk(scores, 2, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    num_tokens = top_ids.shape[0]
    capacity = int(torch.tensor(0.5 * num_tokens * 2 / 4).ceil())
    keep = torch.zeros_like(top_ids, dtype=torch.bool)
    for e in range(4):
        slots = [(t, k) for t in range(num_tokens) for k in range(2) if top_ids[t, k] == e]
        if policy == "probs":
            slots.sort(key=lambda tk: -float(top_w[tk].detach()))
        for t, k in slots[:capacity]:
            keep[t, k] = True
    assert (~keep).any(), "the test must actually drop something"
    assert torch.equal(routing.topk_ids_TK >= 0, keep)
    assert torch.equal(routing.topk_ids_TK[keep], top_ids[keep])
    assert torch.all(routing.topk_weights_TK[~keep] == 0)
    expected_fraction = 1 - keep.double().mean()
    torch.testing.assert_close(routing.stats["dropped_fraction"].double(), expected_fraction)
    out, _ = layer(x)
    torch.testing.assert_close(out, naive_moe(layer, x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_experts_follow_autocast(backend: str) -> None:
    """Under bf16 autocast the expert GEMMs run in bf16, like the model's other matmuls."""
    torch.manual_seed(0)
    layer = MoELayer(tiny_moe_config(experts=dict(backend=backend)))
    x = torch.randn(2, 8, 8)
    reference, _ = layer(x)
    x_ND = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(x)
        assert layer.experts(x_ND, torch.tensor([2, 0, 3, 0])).dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


def test_combine_keeps_the_gates_and_the_top_k_sum_in_float32() -> None:
    """Issue 18, W3: bf16 expert outputs (as under autocast) weighted by float32 gates and summed per token equal
    a float64 sum of the same values to float32 precision; casting the gates to bf16 and summing in bf16 (what
    combine did) is off by about bf16's epsilon."""
    from moe.dispatch import LocalDispatcher

    torch.manual_seed(0)
    tokens, top_k, experts, hidden = 64, 4, 8, 32
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    gates = torch.softmax(torch.randn(tokens, top_k), -1)
    dispatcher = LocalDispatcher(experts)
    x_ND, _, state = dispatcher.dispatch(torch.randn(tokens, hidden), ids)
    y_ND = torch.randn(x_ND.shape).to(torch.bfloat16)
    out = dispatcher.combine(y_ND, gates, state)
    assert out.dtype == torch.float32
    weights = gates.reshape(-1)[state.assignment_index_N].double().unsqueeze(-1)
    reference = torch.zeros(tokens, hidden, dtype=torch.float64).index_add(0, state.token_index_N,
                                                                          y_ND.double() * weights)
    assert (out.double() - reference).abs().max() < 1e-6
    old_way = torch.zeros(tokens, hidden, dtype=torch.bfloat16).index_add(0, state.token_index_N,
                                                                          y_ND * weights.to(torch.bfloat16))
    assert (old_way.double() - reference).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_inference_multiplies_only_the_experts_with_rows(dtype: torch.dtype) -> None:
    """Without autograd on the CPU the grouped_mm backend picks the faster of two loops: with at most two experts
    with rows (a batch-1 decoding step leaves most of them empty) or many rows per expert, a Python loop of three
    matmuls per expert with rows, skipping F.grouped_mm's visit of every expert; in between (a batched decoding
    step), F.grouped_mm's C++ loop. The same output either way (up to a multi-threaded matmul's rounding, about
    1e-11 here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0
            self.grouped = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out)
            self.grouped += func is torch.ops.aten._grouped_mm.default
            return func(*args, **(kwargs or {}))

    generator = torch.Generator().manual_seed(3)
    experts = GroupedExperts(8, 16, 24, "grouped_mm").to(dtype)
    # (experts without rows, rows, the Python loop expected): 2 active; 5 active with ~2 rows each; 8 active
    # with 5 each; 8 active with 100 each (over _CPU_GROUPED_MM_MAX_ROWS_PER_EXPERT).
    for zero_experts, rows, loop in ((6, 2, True), (3, 11, False), (0, 40, False), (0, 800, True)):
        counts = random_counts(8, rows, generator, zero_experts)
        x = torch.randn(rows, 16, generator=generator).to(dtype)
        with torch.no_grad(), CountMatmuls() as matmuls:
            inference = experts(x, counts)
        training = experts(x, counts)  # autograd on: F.grouped_mm
        assert training.requires_grad
        torch.testing.assert_close(inference, training.detach(), rtol=1e-6, atol=1e-9)
        assert (matmuls.count, matmuls.grouped) == ((3 * int((counts > 0).sum()), 0) if loop else (0, 3))
