"""AVMECore and AVME as torch.nn modules: meta init, submodule rules, arguments, dispatch, one source of defaults."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import avme_ext.core
import avme_ext.dispatch
import avme_ext.ops
from avme_ext import AVME, AVMEConfig, AVMECore, loop_types
from avme_ext.config import LOOP_FIELDS
from avme_ext.reference import avme_forward_reference
from helpers import DataSizeArgs, LoopArgs, load_module

SMALL: DataSizeArgs = {"data_dim": 6, "enc_hidden": 5, "dec_hidden": 4, "latent_dim": 3, "steps": 3}
SIZE_NAMES = [field.name for field in dataclasses.fields(AVMEConfig)]
#: The positional arguments of each module: the loop's fields (the core), or every field (the model).
POSITIONAL = {AVMECore: list(LOOP_FIELDS), AVME: SIZE_NAMES}
LOOP_MODULES = {"encoder": nn.LSTMCell, "posterior": nn.Linear, "decoder": nn.LSTMCell, "write": nn.Linear}
SCRIPT = Path(__file__).resolve().parents[1] / "python" / "custom_training_loop.py"


def make_core(num_classes: int = 2, seed: int = 0, impl: str = "ref", precision: str = "fp32") -> AVMECore:
    torch.manual_seed(seed)
    return AVMECore(**SMALL, num_classes=num_classes, impl=impl, precision=precision, dtype=torch.float64)


def make_inputs(core: AVMECore, batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (batch, core.data_dim), generator=g).double()
    labels = torch.randint(0, core.num_classes, (batch,), generator=g)
    y = nn.functional.one_hot(labels, core.num_classes).double() if core.num_classes else None
    eps = torch.randn(core.steps, batch, core.latent_dim, generator=g, dtype=torch.float64)
    return x, y, eps


# ------------------------------------------------------------------ reset_parameters / meta device


@pytest.mark.parametrize("model_class", [AVMECore, AVME])
def test_meta_device_then_to_empty_then_reset_parameters_gives_the_constructed_module(model_class):
    sizes = dict(**SMALL, num_classes=2, impl="ref", dtype=torch.float64)
    torch.manual_seed(3)
    expected = model_class(**sizes)
    module = model_class(**sizes, device="meta")
    assert all(p.is_meta for p in module.parameters())
    module.to_empty(device="cpu")
    for p in module.parameters():  # whatever to_empty left, reset_parameters must overwrite all of it
        nn.init.constant_(p, float("nan"))
    torch.manual_seed(3)
    module.reset_parameters()
    assert module.state_dict().keys() == expected.state_dict().keys()
    for name, value in expected.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name
    core = module if isinstance(module, AVMECore) else module.core
    x, y, eps = make_inputs(core)
    out = core(x, y, eps)
    assert torch.isfinite(out.canvas).all()
    torch.testing.assert_close(out.canvas, avme_forward_reference(x, y, eps, core.loop_params()).canvas)


def test_reset_parameters_draws_new_weights_in_the_init_range():
    core = make_core(seed=0)
    before = {name: value.clone() for name, value in core.state_dict().items()}
    torch.manual_seed(1)
    core.reset_parameters()
    for name, value in core.state_dict().items():
        assert not torch.equal(value, before[name]), name
    bound = core.enc_hidden**-0.5  # nn.LSTMCell: U(-1/sqrt(H), 1/sqrt(H))
    assert core.encoder.weight_ih.abs().max() <= bound
    assert core.encoder.weight_ih.abs().max() > 0.5 * bound


# ------------------------------------------------------------------ submodules the loop cannot call


class LoRALinear(nn.Linear):
    """A low-rank adapter: its forward adds a term the fused loop would never compute."""

    def forward(self, x):
        return super().forward(x) + 1.0


class LoRALSTMCell(nn.LSTMCell):
    def forward(self, x, hx=None):
        return super().forward(x + 1.0, hx)


ADAPTERS = {nn.LSTMCell: LoRALSTMCell, nn.Linear: LoRALinear}


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def same_shaped(module: nn.Module, cls: type[ModuleT]) -> ModuleT:
    """A fresh ``cls`` of the sizes of ``module``, an LSTM cell or a linear layer like ``cls``."""
    if isinstance(module, nn.LSTMCell):
        return cls(module.input_size, module.hidden_size, dtype=torch.float64)
    assert isinstance(module, nn.Linear), module
    return cls(module.in_features, module.out_features, dtype=torch.float64)


@pytest.mark.parametrize("name", LOOP_MODULES)
def test_a_submodule_of_another_class_is_refused(name):
    core = make_core()
    x, y, eps = make_inputs(core)
    expected = LOOP_MODULES[name]
    setattr(core, name, same_shaped(getattr(core, name), expected))  # a fresh module of the exact class is fine
    assert torch.isfinite(core(x, y, eps).canvas).all()
    setattr(core, name, same_shaped(getattr(core, name), ADAPTERS[expected]))
    found = ADAPTERS[expected].__qualname__
    match = rf"AVMECore\.{name} must be exactly torch\.nn\.{expected.__name__}, got .*{found}"
    with pytest.raises(TypeError, match=match):
        core(x, y, eps)
    if name in ("decoder", "write"):
        with pytest.raises(TypeError, match=match):
            core.sample(eps, y)


def test_a_module_of_an_unrelated_class_is_refused():
    core = make_core(num_classes=0)
    core.decoder = nn.GRUCell(core.latent_dim + core.num_classes, core.dec_hidden)  # type: ignore[assignment]  # the wrong class on purpose
    with pytest.raises(TypeError, match=r"AVMECore\.decoder must be exactly torch\.nn\.LSTMCell, got .*GRUCell"):
        core.sample(batch_size=2)


class Doubled(nn.Module):
    def forward(self, weight):
        return 2.0 * weight


def test_a_parametrized_submodule_runs_with_its_parametrized_weights():
    core = make_core()
    x, y, eps = make_inputs(core)
    original = core.write.weight.detach().clone()
    parametrize.register_parametrization(core.write, "weight", Doubled())
    assert type(core.write) is not nn.Linear
    params = core.loop_params()
    torch.testing.assert_close(params.write_w, 2.0 * original)
    torch.testing.assert_close(core(x, y, eps).canvas, avme_forward_reference(x, y, eps, params).canvas)
    adapter = make_core()
    adapter.write = same_shaped(adapter.write, LoRALinear)
    parametrize.register_parametrization(adapter.write, "weight", Doubled())
    with pytest.raises(TypeError, match="LoRALinear"):
        adapter(x, y, eps)


@pytest.mark.parametrize("name", LOOP_MODULES)
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_hooks_on_a_submodule_are_refused(name, kind):
    core = make_core()
    x, y, eps = make_inputs(core)
    calls: list[tuple[object, ...]] = []
    register = getattr(getattr(core, name), f"register_{kind}_hook")
    handle = register(lambda *args: calls.append(args))
    match = rf"AVMECore\.{name} has hooks registered; hooks on the submodules cannot run because the loop is fused"
    with pytest.raises(RuntimeError, match=match):
        core(x, y, eps)
    handle.remove()
    assert torch.isfinite(core(x, y, eps).canvas).all()
    assert calls == []


def test_hooks_on_the_core_itself_run():
    core = make_core()
    x, y, eps = make_inputs(core)
    seen = []
    core.register_forward_hook(lambda module, args, output: seen.append(output.canvas))
    out = core(x, y, eps)
    assert len(seen) == 1
    assert seen[0] is out.canvas


# ------------------------------------------------------------------ arguments


def test_noise_and_generator_together_are_an_error():
    core = make_core()
    x, y, eps = make_inputs(core)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="pass eps or generator, not both"):
        core(x, y, eps, generator=generator)
    with pytest.raises(ValueError, match="pass z or generator, not both"):
        core.sample(eps, y, generator=generator)
    torch.manual_seed(0)
    model = AVME(**SMALL, num_classes=2, impl="ref", dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="pass eps or generator, not both"):
        model(x, labels, eps=eps, generator=generator)
    with pytest.raises(ValueError, match="pass eps or generator, not both"):
        model.loss(x, labels, eps=eps, generator=generator)
    # Each alone still works; the loss takes eps like forward does.
    torch.testing.assert_close(model.loss(x, labels, eps=eps)[0], model(x, labels, eps=eps).loss.mean())
    assert torch.isfinite(model.loss(x, labels, generator=generator)[0])


@pytest.mark.parametrize("model_class", [AVMECore, AVME])
def test_options_are_keyword_only_and_sizes_positional(model_class):
    names = POSITIONAL[model_class]
    positional = [SMALL.get(name, getattr(AVMEConfig(), name)) for name in names]
    parameters = inspect.signature(model_class).parameters
    assert list(parameters)[: len(names)] == names
    for option in ("impl", "precision", "device", "dtype"):
        assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY, option
    with pytest.raises(TypeError):
        model_class(*positional, "ref")
    module = model_class(*positional, impl="ref", device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in module.parameters())
    assert module.config == AVMEConfig(**SMALL)


# ------------------------------------------------------------------ one source of defaults and choices


@pytest.mark.parametrize("model_class", [AVMECore, AVME])
def test_size_defaults_and_validation_come_from_the_config(model_class):
    parameters = inspect.signature(model_class).parameters
    defaults = AVMEConfig()
    for name in POSITIONAL[model_class]:
        assert parameters[name].default == getattr(defaults, name), name
    assert model_class(device="meta").config == defaults
    sizes: LoopArgs = {**SMALL, "num_classes": 3, "encoder_input": "error"}
    module = model_class(**sizes, device="meta")
    assert module.config == AVMEConfig(**sizes)
    core = module if isinstance(module, AVMECore) else module.core
    for name, value in sizes.items():
        assert getattr(core, name) == value, name
    bad_sizes: list[LoopArgs] = [{"data_dim": 0}, {"steps": True}, {"num_classes": -1}, {"encoder_input": "diff"}]
    for bad in bad_sizes:
        (name,) = bad
        with pytest.raises(ValueError, match=rf"^{name} must be ") as from_config:
            AVMEConfig(**bad)
        with pytest.raises(ValueError, match=rf"^{name} must be ") as from_module:
            model_class(**bad, device="meta")
        assert str(from_module.value) == str(from_config.value)


def test_choices_have_one_source():
    assert avme_ext.core.IMPLS is loop_types.IMPLS == ("auto", "cuda", "ref")
    assert avme_ext.ops.PRECISIONS is loop_types.PRECISIONS == ("fp32", "tf32", "bf16")
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'cuda', 'ref'\)"):
        AVMECore(impl="fused", device="meta")
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'tf32', 'bf16'\)"):
        AVMECore(precision="fp16", device="meta")


def load_script() -> ModuleType:
    return load_module("custom_training_loop", SCRIPT)


def test_custom_training_loop_takes_its_sizes_from_the_config(capsys):
    script = load_script()
    assert script.model_config(script.parse_args(["--paper-sizes"])) == AVMEConfig()
    small = script.model_config(script.parse_args([]))
    assert small == script.SMALL_SIZES
    assert script.model_config(script.parse_args(["--classes", "3", "--hidden", "7"])) == dataclasses.replace(
        small, num_classes=3, enc_hidden=7, dec_hidden=7
    )
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        script.model_config(script.parse_args(["--steps", "0"]))
    script.main(["--iters", "2", "--batch", "4", "--classes", "2", "--impl", "ref"])
    assert "AVMECore running 'ref' on cpu" in capsys.readouterr().out


# ------------------------------------------------------------------ impl="auto"


class AutoSpy:
    """Stands in for avme_ext.dispatch.auto_impl: records its arguments, answers ``choice``."""

    def __init__(self, choice: str):
        self.choice = choice
        self.calls: list[tuple[object, ...]] = []

    def __call__(self, device, dtype, precision, batch_size, model):
        self.calls.append((device, dtype, precision, batch_size, model))
        return self.choice


def test_auto_asks_the_dispatch_table_with_the_call_batch_size(monkeypatch):
    spy = AutoSpy("ref")
    monkeypatch.setattr(avme_ext.dispatch, "auto_impl", spy)
    core = make_core(impl="auto", precision="tf32")
    x, y, eps = make_inputs(core, batch=5)
    assert core.resolved_impl("cpu", 7) == "ref"
    assert spy.calls == [(torch.device("cpu"), torch.float64, "tf32", 7, core.config)]  # the model's sizes too
    spy.calls.clear()
    core(x, y, eps)
    core.sample(eps[:, :3], y[:3])
    assert spy.calls == [(torch.device("cpu"), torch.float64, "tf32", b, core.config) for b in (5, 3)]
    assert core.resolved_impl("cpu") == "auto"  # no batch size: chosen per call
    with pytest.raises(ValueError, match="batch_size must be an integer >= 0"):
        core.resolved_impl("cpu", -1)


def test_auto_runs_what_the_dispatch_table_chooses(monkeypatch):
    core = make_core(impl="auto")
    x, y, eps = make_inputs(core)
    fused_calls = []

    def fake_fused_forward(x, y, eps, params, encoder_input, return_canvases, precision, *, design):
        fused_calls.append(precision)
        assert design == "auto"  # on the CPU nothing was measured: the host would choose
        return avme_forward_reference(x, y, eps, params, encoder_input, return_canvases)

    monkeypatch.setattr(avme_ext.ops, "fused_forward", fake_fused_forward)
    monkeypatch.setattr(avme_ext.dispatch, "auto_impl", AutoSpy("cuda"))
    core(x, y, eps)
    assert fused_calls == ["fp32"]
    monkeypatch.setattr(avme_ext.dispatch, "auto_impl", AutoSpy("ref"))
    core(x, y, eps)
    assert fused_calls == ["fp32"]
    monkeypatch.setattr(avme_ext.dispatch, "auto_impl", AutoSpy("triton"))
    with pytest.raises(RuntimeError, match="auto_impl returned 'triton'"):
        core(x, y, eps)


def test_forced_implementations_do_not_ask_the_dispatch_table(monkeypatch):
    spy = AutoSpy("cuda")
    monkeypatch.setattr(avme_ext.dispatch, "auto_impl", spy)
    assert make_core(impl="ref").resolved_impl("cpu", 4) == "ref"
    with pytest.raises(RuntimeError, match=r"impl='cuda'.*not on a CUDA device"):
        make_core(impl="cuda").resolved_impl("cpu", 4)
    monkeypatch.setattr(avme_ext.ops, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"impl='cuda'.*extension is not built"):
        make_core(impl="cuda").resolved_impl("cuda", 4)
    assert spy.calls == []


def test_design_blocks_nest_and_refuse_unknown_names():
    assert avme_ext.ops.requested_design() == "auto"
    with avme_ext.ops.design("stagewise"):
        assert avme_ext.ops.requested_design() == "stagewise"
        with avme_ext.ops.design("persistent"):
            assert avme_ext.ops.requested_design() == "persistent"
        assert avme_ext.ops.requested_design() == "stagewise"
    assert avme_ext.ops.requested_design() == "auto"
    with pytest.raises(ValueError, match="design must be one of"), avme_ext.ops.design("fastest"):
        pass


def test_fused_design_is_forced_then_measured_then_left_to_the_host(monkeypatch):
    core = AVMECore(16, 0, 8, 8, 4, 2)
    asked = []

    def table(device, dtype, precision, batch_size, model):
        assert model is core.config
        asked.append((device.type, dtype, precision, batch_size))
        return "ref" if batch_size < 100 else "stagewise"

    monkeypatch.setattr(avme_ext.dispatch, "auto_design", table)
    assert core.fused_design("cuda", 10) == "auto"  # never measured faster: the host decides
    assert core.fused_design("cuda", 500) == "auto:stagewise"  # the measured crossover, where it can run
    with avme_ext.ops.design("rowtile"):
        assert core.fused_design("cuda", 500) == "rowtile"  # forced beats measured
    assert asked == [("cuda", torch.float32, "fp32", 10), ("cuda", torch.float32, "fp32", 500)]


def test_option_tuples_are_the_loop_types_objects_everywhere():
    import argparse

    import avme_ext.training.config as training_config
    from avme_ext.cli import _common

    parser = argparse.ArgumentParser()
    _common.add_device_arguments(parser)
    cli_choices = {action.dest: action.choices for action in parser._actions}
    assert cli_choices["impl"] is loop_types.IMPLS
    assert cli_choices["precision"] is loop_types.PRECISIONS
    assert training_config.IMPLS is loop_types.IMPLS
    assert training_config.PRECISIONS is loop_types.PRECISIONS
    assert avme_ext.dispatch.DESIGN_NAMES is loop_types.DESIGNS
    assert avme_ext.ops.DESIGNS is loop_types.DESIGNS


def test_distributed_does_not_import_evaluation():
    import subprocess
    import sys

    code = "import sys, avme_ext.distributed; assert 'avme_ext.evaluation' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
