"""Fixtures of the fused-op tests: ``backend`` (the emulator, or CUDA when present)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from avme_ext import ops

from . import backends

#: Every kernel design, each forced by name (``"auto"`` picks one of these).
NAMED_DESIGNS = tuple(d for d in ops.DESIGNS if d != "auto")


def _backend(name: str) -> backends.Backend:
    try:
        return backends.get(name)
    except backends.MissingExtensionError as exc:
        pytest.fail(str(exc))
    except backends.UnavailableError as exc:
        pytest.skip(f"{name} backend: {exc}")


@pytest.fixture(params=backends.BACKENDS)
def backend(request) -> backends.Backend:
    """The ops on the CPU emulator and on CUDA (each skipped with the reason where it cannot
    run). Tests parametrised with ``backend_params`` pick the backends per case."""
    return _backend(request.param)


@pytest.fixture
def cuda_backend() -> backends.Backend:
    return _backend("cuda")


@pytest.fixture
def emulator_backend() -> Iterator[backends.Backend]:
    """The CPU emulator alone (skipped with the reason where it cannot be built); its schedule is
    reset to "concurrent" after the test."""
    backend = _backend("emulator")
    yield backend
    backend.ns.set_schedule("concurrent")


@pytest.fixture
def emu_sms(monkeypatch):
    """Set the emulated SM count (steers rows per block: B / SMs rounded up to 1, 2, 4, 8).
    No effect on CUDA."""

    def set_sms(n: int) -> None:
        monkeypatch.setenv("AVME_EMU_SMS", str(n))

    return set_sms


@pytest.fixture
def one_emulated_sm(emu_sms) -> None:
    """One emulated SM, the fewest OS threads per launch, for the tests whose rows per block do
    not matter (the cases of helpers.CASES set their own). No effect on CUDA."""
    emu_sms(1)


@pytest.fixture(params=NAMED_DESIGNS)
def each_design(request):
    """Run the test once per kernel design, forced with :func:`avme_ext.ops.design`."""
    with ops.design(request.param):
        yield request.param
