"""torch.compile: Tucker models and the fixed-rank core step compile without graph breaks, and
rank-adaptive training recompiles only when a capacity changes (counted with a counting
backend, which runs the captured graphs eagerly)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from tuckerman.integrations.torch import TDLRT, TuckerConv2d, TuckerLinear  # noqa: E402

import tuckerman as tm  # noqa: E402
from tuckerman import engine  # noqa: E402


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as captured."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    # dynamo falls back to eager (fullgraph: raises) after 8 graphs per function by default;
    # a run visiting many capacities needs more (two graphs per capacity in two-pass mode)
    with warnings.catch_warnings(), cfg.patch({limit: 64}):
        warnings.simplefilter("ignore", UserWarning)  # dynamo's notes on lru_cache wrappers
        yield
    torch._dynamo.reset()


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        TuckerConv2d(3, 8, 3, padding=1, ranks=(8, 3), dtype=dtype),
        nn.ReLU(),
        nn.Flatten(),
        TuckerLinear(8 * 6 * 6, 10, ranks=8, dtype=dtype),
    )


def _shapes(model) -> tuple:
    return tuple(m.capacity for m in model.modules() if hasattr(m, "capacity"))


def test_a_tucker_model_compiles_in_one_graph_and_matches_eager():
    model = _model()
    model[0].set_capacity((8, 3, 3, 3))
    model[0].set_tucker(tm.truncate_core(model[0].tucker(), ranks=(5, 3, 3, 3))[0])  # padded
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    out = compiled(x)
    ref = model(x)
    assert backend.graphs == 1
    assert torch.allclose(out, ref, atol=1e-13, rtol=0)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref.square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("one_pass", [False, True])
def test_rank_adaptive_training_recompiles_only_when_a_capacity_changes(one_pass):
    """200 steps with ranks shrinking (large tau) then growing (small tau) across capacity
    classes: one graph per forward shape setting (the capacity, and its augmented workspace
    for the second evaluation), none per rank configuration."""
    torch.manual_seed(0)
    model = nn.Sequential(
        TuckerConv2d(3, 16, 3, padding=1, ranks=(12, 3), dtype=torch.float64),
        nn.Tanh(),
        nn.Flatten(),
        TuckerLinear(16 * 4 * 4, 32, ranks=24, dtype=torch.float64),
        nn.Tanh(),
        nn.Linear(32, 10, dtype=torch.float64),
    )
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    opt = TDLRT(model, lr=0.1, momentum=0.9, one_pass=one_pass)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 10, (64,)))
        for _ in range(4)
    ]
    capacities, seen = set(), []
    for step in range(200):
        opt.param_groups[0]["tau"] = 0.6 if step < 40 else 1e-4  # shrink, then grow
        x, y = data[step % 4]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(compiled(x), y)
            loss.backward()
            return loss

        capacities.add(_shapes(model))
        opt.step(closure)
        seen.append((_shapes(model), tuple(sorted(opt.rank_history[-1].items()))))
    assert len(capacities) >= 3, capacities  # the capacities did change
    per_capacity = 1 if one_pass else 2  # the point, and (two-pass) its augmented workspace
    assert backend.graphs <= per_capacity * len(capacities)
    # two-pass ranks also moved inside capacities, which compiled nothing (one-pass ranks with a
    # small tau double at each change: every change crosses a power of two here)
    inside = sum(c0 == c1 and r0 != r1 for (c0, r0), (c1, r1) in zip(seen, seen[1:]))
    assert inside > 0 or one_pass


def test_the_fixed_rank_core_step_compiles_in_one_graph():
    x = tm.FixedRankTucker((12, 10, 8), (3, 4, 2)).random_point(
        key=0, xp="torch", dtype=torch.float64
    )
    lay = engine.make_layout(x.shape, x.ranks, adaptive_modes=())
    cfg = engine.Config(momentum=0.9)

    def step(core, f0, f1, f2, ranks, gc, g0, g1, g2, buf):
        p = engine.PaddedTucker(core, (f0, f1, f2), ranks)
        (a,), (maps,) = engine.augment([lay], [p], [[g0, g1, g2]])
        (g,) = engine.tangent_core_gradients([lay], [p], [a], [maps], [gc], [[g0, g1, g2]])
        st = engine.transport_state(cfg, (buf,), maps)
        c, st = engine.inner_update(cfg, a.core, g, st, 1, 0.1)
        (y,), (tmaps,), _ = engine.truncate(
            [lay], cfg, [a._replace(core=c)], [p.ranks], fixed_rank=True, out_capacity=[x.ranks]
        )
        return y.core, y.factors, y.ranks, engine.transport_state(cfg, st, tmaps)[0]

    backend = CountingBackend()
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(2)
    p = engine.PaddedTucker.from_tucker(x)
    args = (
        p.core,
        *p.factors,
        p.ranks,
        torch.randn(x.ranks, generator=gen, dtype=torch.float64),
        *[torch.randn(n, r, generator=gen, dtype=torch.float64) for n, r in zip(x.shape, x.ranks)],
        torch.zeros(x.ranks, dtype=torch.float64),
    )
    out, ref = compiled(*args), step(*args)
    assert backend.graphs == 1
    dense = tm.TuckerTensor(out[0], out[1]).to_dense()
    assert torch.allclose(dense, tm.TuckerTensor(ref[0], ref[1]).to_dense(), atol=1e-13, rtol=0)
    assert torch.equal(out[2], ref[2]) and torch.allclose(out[3], ref[3], atol=1e-13, rtol=0)
