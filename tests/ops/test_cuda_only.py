"""What only a GPU can check: torch.compile with inductor, CUDA graphs, training with Adam
against the reference, the sanitizer script, and (opt-in) int64 offsets of a huge batch.

Every test skips with the reason where no CUDA device and built extension are present. The
huge-batch test (about 12 GB) is marked slow: ``pytest --runslow`` runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from avme_ext.core import AVMECore
from avme_ext.reference import avme_forward_reference

from .backends import REPO
from .helpers import (
    ODD,
    PAPER,
    Sizes,
    assert_finite,
    assert_within,
    fp32_bounds,
    to_reference,
)


def make_module(sizes: Sizes, C: int, K: int, encoder_input: str, *, impl="cuda", seed=0) -> AVMECore:
    torch.manual_seed(seed)
    return AVMECore(
        data_dim=sizes.D, num_classes=C, enc_hidden=sizes.He, dec_hidden=sizes.Hd,
        latent_dim=sizes.Z, steps=K, encoder_input=encoder_input, impl=impl, device="cuda",
    )  # fmt: skip


def cuda_inputs(B: int, K: int, sizes: Sizes, C: int, seed: int = 1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.rand(B, sizes.D, generator=gen, device="cuda") < 0.3).float()
    y = None
    if C:
        labels = torch.randint(0, C, (B,), generator=gen, device="cuda")
        y = F.one_hot(labels, C).float()
    eps = torch.randn(K, B, sizes.Z, generator=gen, device="cuda")
    return x, y, eps


def elbo_loss(out, x):
    bce = F.binary_cross_entropy_with_logits(out.canvas, x, reduction="sum")
    kl = 0.5 * (out.mu.square() + out.logvar.exp() - 1 - out.logvar).sum()
    return (bce + kl) / x.shape[0]


def test_torch_compile_inductor_fullgraph_matches_eager(cuda_backend):
    torch._dynamo.reset()
    core = make_module(ODD, 10, 6, "error")
    x, y, eps = cuda_inputs(33, 6, ODD, 10)

    def loss_fn(x, y, eps):
        out = core(x, y, eps, return_canvases=True)
        return elbo_loss(out, x) + out.canvases.square().mean()

    params = list(core.parameters())
    eager = loss_fn(x, y, eps)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(loss_fn, fullgraph=True)
    got = compiled(x, y, eps)
    got_grads = torch.autograd.grad(got, params)
    names = ["loss", *[n for n, _ in core.named_parameters()]]
    # Same ops on both sides; inductor may fuse and reorder the float32 loss arithmetic
    # around them, hence a few float32 ulps of the sums, not bitwise equality.
    assert_within(
        dict(zip(names, [got, *got_grads], strict=True)), dict(zip(names, [eager, *eager_grads], strict=True)), 1e-5
    )


def test_cuda_graph_capture_replay_equals_eager(cuda_backend):
    core = make_module(ODD, 10, 5, "error")
    params = list(core.parameters())
    x, y, eps = cuda_inputs(17, 5, ODD, 10)
    static_x, static_eps = x.clone(), eps.clone()

    def step():
        out = core(static_x, y, static_eps, return_canvases=True)
        loss = out.canvas.square().sum() + out.mu.sum() + out.logvar.square().sum() + out.canvases.sum()
        return (loss, out.canvas, *torch.autograd.grad(loss, params))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    x2, _, eps2 = cuda_inputs(17, 5, ODD, 10, seed=7)
    static_x.copy_(x2)
    static_eps.copy_(eps2)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in static_out]
    eager = step()
    assert_finite({f"out{i}": t for i, t in enumerate(replayed)})
    # The same kernels on the same inputs; cuBLAS may pick another algorithm for the eager
    # run's gradient matmuls, so a float32 rounding-level difference is allowed.
    for g, e in zip(replayed, eager, strict=True):
        assert torch.allclose(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
def test_adam_training_matches_reference(cuda_backend, encoder_input):
    K, C = 6, 10
    fused = make_module(ODD, C, K, encoder_input, impl="cuda")
    ref = make_module(ODD, C, K, encoder_input, impl="ref")
    ref.load_state_dict(fused.state_dict())
    opt_f = torch.optim.Adam(fused.parameters(), lr=1e-3)
    opt_r = torch.optim.Adam(ref.parameters(), lr=1e-3)
    losses: dict[str, list[float]] = {"fused": [], "ref": []}
    for step in range(10):
        x, y, eps = cuda_inputs(64, K, ODD, C, seed=100 + step)
        for name, core, opt in (("fused", fused, opt_f), ("ref", ref, opt_r)):
            loss = elbo_loss(core(x, y, eps), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    # Both run in float32 from the same weights; their per-step rounding differences are
    # amplified by 10 Adam steps (Adam normalises the gradient), so 1e-4 relative.
    for a, b in zip(losses["fused"], losses["ref"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(b), losses  # a NaN fails this comparison too


def test_sanitizer_case_runs(cuda_backend):
    """tests/sanitizer_case.py (run under compute-sanitizer by hand) passes on its own."""
    result = subprocess.run(
        [sys.executable, "-X", "faulthandler", str(REPO / "tests" / "sanitizer_case.py")],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_huge_batch_int64_offsets(cuda_backend):
    K, B = 12, 230_000  # K*B*D = 2.16e9 > 2^31 elements in the canvases output
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    core = make_module(PAPER, 0, K, "error")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.rand(B, PAPER.D, generator=gen, device="cuda") < 0.3).float()
    eps = torch.randn(K, B, PAPER.Z, generator=gen, device="cuda")
    with torch.no_grad():
        out = core(x, eps=eps, return_canvases=True)
        rows = torch.tensor([0, 1, B // 2, B - 2, B - 1], device="cuda")

        def reference(dtype):
            r = avme_forward_reference(
                x[rows].to(dtype), None, eps[:, rows].to(dtype), to_reference(core.loop_params(), dtype),
                "error", True,
            )  # fmt: skip
            return {"canvas": r.canvas, "canvases": r.canvases, "mu": r.mu}

        got = {"canvas": out.canvas[rows], "canvases": out.canvases[:, rows], "mu": out.mu[:, rows]}
        ref = reference(torch.float64)
        assert_within(got, ref, fp32_bounds(reference(torch.float32), ref))
