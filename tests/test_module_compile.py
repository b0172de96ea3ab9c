"""AVME and AVMECore under torch.compile(fullgraph=True): no graph breaks, same numbers as eager.

The tests use the "aot_eager" backend (Dynamo + AOTAutograd, no code generation); the one that
compiles with inductor is marked slow (``pytest --runslow``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from avme_ext import AVME
from helpers import DataSizeArgs

TINY: DataSizeArgs = {"data_dim": 12, "enc_hidden": 8, "dec_hidden": 6, "latent_dim": 3, "steps": 4}
BATCH = 5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(num_classes: int, encoder_input: str = "canvas", impl: str = "ref") -> AVME:
    torch.manual_seed(0)
    return AVME(**TINY, num_classes=num_classes, encoder_input=encoder_input, impl=impl).double()


def make_batch(num_classes: int, batch: int = BATCH, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (batch, TINY["data_dim"]), generator=g).double()
    y = torch.randint(0, num_classes, (batch,), generator=g) if num_classes else None
    eps = torch.randn(TINY["steps"], batch, TINY["latent_dim"], generator=g, dtype=torch.float64)
    return x, y, eps


def loss_and_grads(model: AVME, loss_fn, *args):
    """Loss value and the gradient of every parameter, gradients poisoned with NaN first."""
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    model.zero_grad(set_to_none=True)
    loss = loss_fn(*args)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        grads[name] = p.grad.clone()
    return loss.detach(), grads


def assert_same_loss_and_grads(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert torch.isfinite(got[1][name]).all(), name
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(("num_classes", "encoder_input"), [(0, "canvas"), (3, "error")])
def test_no_graph_breaks(num_classes, encoder_input):
    model = tiny_model(num_classes, encoder_input)
    x, y, eps = make_batch(num_classes)
    y_vec = model.encode_labels(y, BATCH)
    cases: dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor | None, ...]]] = {
        "AVME.forward": (lambda x, y, eps: model(x, y, eps=eps).loss, (x, y, eps)),
        "AVME.loss, noise drawn inside": (lambda x, y: model.loss(x, y)[0], (x, y)),
        "AVME.loss": (lambda x, y, eps: model.loss(x, y, eps=eps)[0], (x, y, eps)),
        "AVMECore.forward": (lambda x, y, eps: model.core(x, y, eps).canvas, (x, y_vec, eps)),
        "AVMECore.sample": (lambda z, y: model.core.sample(z, y).canvas, (eps, y_vec)),
    }
    for name, (fn, args) in cases.items():
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0, (name, explanation.break_reasons)
        assert explanation.graph_count == 1, name


def compiled_matches_eager(backend: str, num_classes: int, encoder_input: str) -> None:
    model = tiny_model(num_classes, encoder_input)
    x, y, eps = make_batch(num_classes)

    def loss_fn(x, y, eps):
        return model.loss(x, y, kl_weight=0.7, eps=eps)[0]

    compiled = torch.compile(loss_fn, backend=backend, fullgraph=True)
    want = loss_and_grads(model, loss_fn, x, y, eps)
    got = loss_and_grads(model, compiled, x, y, eps)
    assert_same_loss_and_grads(got, want)
    # Fresh inputs of another batch size run through the compiled code as well.
    x, y, eps = make_batch(num_classes, batch=7, seed=2)
    assert_same_loss_and_grads(loss_and_grads(model, compiled, x, y, eps), loss_and_grads(model, loss_fn, x, y, eps))


@pytest.mark.parametrize(
    ("num_classes", "encoder_input"), [(0, "canvas"), pytest.param(3, "error", marks=pytest.mark.slow)]
)
def test_compiled_loss_forward_and_backward_match_eager(num_classes, encoder_input):
    compiled_matches_eager("aot_eager", num_classes, encoder_input)


@pytest.mark.slow  # inductor compiles C++
def test_inductor_loss_forward_and_backward_match_eager():
    compiled_matches_eager("inductor", 3, "canvas")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ref", "auto"])
def test_compiled_loss_with_noise_drawn_inside_matches_eager(impl):
    model = tiny_model(3, impl=impl)

    def loss_fn(x, y):
        return model.loss(x, y)[0]

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    for batch in (BATCH, 7):  # a new batch size recompiles with a symbolic one
        x, y, _ = make_batch(3, batch=batch, seed=batch)
        torch.manual_seed(batch)
        want = loss_and_grads(model, loss_fn, x, y)
        torch.manual_seed(batch)
        got = loss_and_grads(model, compiled, x, y)
        assert_same_loss_and_grads(got, want)


def test_compiled_code_still_checks_values():
    model = tiny_model(3)
    x, y, eps = make_batch(3)
    compiled = torch.compile(lambda x, y, eps: model(x, y, eps=eps).loss, backend="aot_eager", fullgraph=True)
    assert torch.isfinite(compiled(x, y, eps)).all()
    gray = x.clone()
    gray[1, 2] = 0.5
    with pytest.raises(RuntimeError, match="x must be binary"):
        compiled(gray, y, eps)
    nan = x.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="x must be binary"):
        compiled(nan, y, eps)
    with pytest.raises(RuntimeError, match=r"y must hold labels in \[0, 3\)"):
        compiled(x, torch.tensor([0, 1, 3, 0, 1]), eps)
    with pytest.raises(RuntimeError, match=r"y must hold labels in \[0, 3\)"):
        compiled(x, torch.tensor([0, -1, 2, 0, 1]), eps)
