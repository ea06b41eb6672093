"""Start-up latency profiles: reused only in their context and when sane, else profiled (at most twice) and then
corrected from the compiled graphs' FLOPs; wrong profiles on a real engine are refused or corrected in a bound."""
import dataclasses
import json
import logging

import numpy as np
import pytest

from flexc.runtime.latency import FEATURES, LatencyModel
from flexc.runtime.latency_checks import FlopCosts, ProfileContext, check_fit, correct_fit
from flexc.runtime.profiling import PROFILE_ATTEMPTS, load_or_profile
from tests.runtime.test_latency import _samples, _truth

# FLOPs per unit at which the true costs of _truth imply 1e10 FLOP/s each
COSTS = FlopCosts(per_unit={"decode_tokens": 2e6, "prefill_tokens": 1e6, "ft_forward_tokens": 3e6,
                            "ft_backward_layer_tokens": 6e6, "ft_loss_tokens": 4e6}, min_flops_per_s=1e5,
                  max_flops_per_s=1e14, typical_flops_per_s=1e9)
CTX = ProfileContext(model="tiny", graph="0123456789abcdef", dtype="torch.float32", torch_threads=2, device="cpu",
                     torch_version="2.13.0", backend="eager", machine="Some CPU x2")
TRUE = np.array([0.004, 2e-4, 1e-4, 1e-8, 3e-4, 6e-4, 2e-3, 4e-4, 3e-3, 0.02, 0.01])


class Profiler:
    """Counts the profiles taken; returns ``samples`` each time."""

    def __init__(self, samples):
        self.samples, self.calls = samples, 0

    def __call__(self):
        self.calls += 1
        return self.samples


def test_profile_reused_only_in_its_context(tmp_path, caplog):
    """A profile is saved with its context; the same context reuses it (no profiling), another context profiles
    again with one log line naming the differing field, and so does a file without a context."""
    path = str(tmp_path / "lat.json")
    prof = Profiler(_samples(30))
    assert load_or_profile(LatencyModel(10), path, CTX, COSTS, prof) == "profiled" and prof.calls == 1
    assert json.load(open(path))["context"] == CTX.to_dict()
    m = LatencyModel(10)
    assert load_or_profile(m, path, CTX, COSTS, prof) == "loaded" and prof.calls == 1
    assert m.coef == pytest.approx(TRUE, rel=1e-2) and len(m.samples) == 30
    other = dataclasses.replace(CTX, torch_threads=1)
    with caplog.at_level(logging.WARNING, logger="flexc.runtime.profiling"):
        assert load_or_profile(LatencyModel(10), path, other, COSTS, prof) == "profiled" and prof.calls == 2
    lines = [r.message for r in caplog.records if "not reused" in r.message]
    assert len(lines) == 1 and "torch_threads=2" in lines[0] and "has 1" in lines[0]
    d = json.load(open(path))
    d.pop("context")
    json.dump(d, open(path, "w"))
    assert load_or_profile(LatencyModel(10), path, CTX, COSTS, prof) == "profiled" and prof.calls == 3


def test_degenerate_profile_refused_then_corrected(tmp_path, caplog):
    """The issue's profile (a big constant, zero finetuning costs, 18 samples) is refused; a grid that again
    prices the backward at 0 is profiled PROFILE_ATTEMPTS times, then corrected from the FLOPs (the sane costs'
    seconds per FLOP: the true backward cost here) with a warning, and not saved."""
    path = str(tmp_path / "lat.json")
    bad = LatencyModel(10, [0.36, 2e-4, 1e-4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    bad.set_profile(bad.coef, [(w.features(10), 0.36) for w, _ in _samples(18)])
    bad.save(path, CTX.to_dict())
    before = open(path).read()
    works = [dataclasses.replace(w, ft_backward_layer_tokens=0, ft_backward_layers=0) for w, _ in _samples(30)]
    prof = Profiler([(w, _truth(w)) for w in works])
    m = LatencyModel(10)
    with caplog.at_level(logging.WARNING, logger="flexc.runtime.profiling"):
        assert load_or_profile(m, path, CTX, COSTS, prof) == "corrected"
    assert prof.calls == PROFILE_ATTEMPTS
    text = " ".join(r.message for r in caplog.records)
    assert "not reused" in text and "ft_forward_tokens" in text and "corrected" in text
    bwd = FEATURES.index("ft_backward_layer_tokens")
    assert m.coef[bwd] == pytest.approx(6e-4, rel=1e-2)
    assert not check_fit(m.coef, COSTS)
    assert open(path).read() == before


def test_check_fit_bounds():
    """The true costs pass; zero, 1e5x too fast (work nearly free) or too slow, few samples, large residuals fail;
    correct_fit puts an implausible cost back at the sane ones' seconds per FLOP."""
    assert check_fit(TRUE, COSTS, samples=30, residual=0.1) == []
    for i, f in ((1, 1e-5), (4, 0.0), (5, 1e6), (2, -1.0)):
        coef = TRUE.copy()
        coef[i] *= f
        problems = check_fit(coef, COSTS)
        assert len(problems) == 1 and problems[0].startswith(FEATURES[i]), problems
        assert correct_fit(coef, COSTS) == pytest.approx(TRUE)
    assert "samples" in check_fit(TRUE, COSTS, samples=5)[0]
    assert "residual" in check_fit(TRUE, COSTS, residual=0.8)[0]
    assert CTX.differs(CTX.to_dict()) is None
    assert "backend" in CTX.differs(dict(CTX.to_dict(), backend="inductor"))
