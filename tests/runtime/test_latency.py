"""Latency model: recovers known costs, respects budgets, refines online, persists."""
import numpy as np
import pytest

from flexc.runtime.latency import FEATURES, IterationWork, LatencyModel


def _truth(w: IterationWork) -> float:
    return (0.004 + 2e-4 * w.decode_tokens + 1e-4 * w.prefill_tokens + 1e-8 * w.attention_pairs
            + 3e-4 * w.ft_forward_tokens + 6e-4 * w.ft_backward_layer_tokens / 10 + 0.02 * w.ft_forward_passes
            + 2e-3 * w.ft_backward_layers / 10)


def _samples(n, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = IterationWork(decode_tokens=int(rng.integers(0, 64)), prefill_tokens=int(rng.integers(0, 256)),
                          attention_pairs=int(rng.integers(0, 200_000)), ft_forward_tokens=int(rng.integers(0, 256)),
                          ft_backward_layer_tokens=int(rng.integers(0, 5000)),
                          ft_forward_passes=int(rng.integers(0, 2)), ft_backward_layers=int(rng.integers(0, 10)))
        out.append((w, _truth(w) * (1 + noise * rng.standard_normal())))
    return out


def test_fit_recovers_coefficients():
    """Fitted on exact measurements of a linear cost, the model predicts unseen batches within 1%."""
    m = LatencyModel(num_layers=10).fit(_samples(60))
    for w, t in _samples(20, seed=1):
        assert m.predict(w) == pytest.approx(t, rel=1e-2)


def test_max_extra_stays_within_budget():
    """The finetuning tokens the model admits keep the predicted time under the budget, one more does not."""
    m = LatencyModel(num_layers=10).fit(_samples(60))
    base = IterationWork(decode_tokens=16)
    n = m.max_extra(base, 0.045, "ft_forward_tokens", limit=10_000)
    assert 0 < n < 10_000
    assert m.predict(IterationWork(decode_tokens=16, ft_forward_tokens=n)) <= 0.045
    assert m.predict(IterationWork(decode_tokens=16, ft_forward_tokens=n + 1)) > 0.045
    assert m.max_extra(IterationWork(decode_tokens=10_000), 0.045, "ft_forward_tokens", 100) == 0


def test_a_pass_of_its_own_is_paid_once():
    """Finetuning forward tokens come with a pass of their own: the admitted count pays its fixed cost once,
    and none are admitted when the pass alone would break the budget."""
    m = LatencyModel(num_layers=10).fit(_samples(80))
    base, unit, fixed = IterationWork(decode_tokens=16), IterationWork(ft_forward_tokens=1), \
        IterationWork(ft_forward_passes=1)
    n = m.max_units(base, 0.045, unit, 10_000, fixed=fixed)
    assert 0 < n < m.max_extra(base, 0.045, "ft_forward_tokens", 10_000)
    assert m.predict(IterationWork(decode_tokens=16, ft_forward_tokens=n, ft_forward_passes=1)) <= 0.045
    assert m.predict(IterationWork(decode_tokens=16, ft_forward_tokens=n + 1, ft_forward_passes=1)) > 0.045
    assert m.max_units(base, m.predict(base) + 0.01, unit, 100, fixed=fixed) == 0


def test_online_refinement_tracks_a_slower_machine():
    """After the machine becomes 2x slower, observed iterations pull the predictions to the new speed."""
    m = LatencyModel(num_layers=10, window=64, refit_every=8).fit(_samples(40))
    for w, t in _samples(64, seed=2):
        m.observe(w, 2 * t)
    w, t = _samples(1, seed=3)[0]
    assert m.predict(w) == pytest.approx(2 * t, rel=0.02)


def test_save_load_roundtrip(tmp_path):
    """A saved model loads with the same predictions; a foreign file is a clear ValueError."""
    m = LatencyModel(num_layers=10).fit(_samples(30))
    p = tmp_path / "lat.json"
    m.save(str(p))
    m2 = LatencyModel.load(str(p))
    w = _samples(1, seed=5)[0][0]
    assert m2.predict(w) == pytest.approx(m.predict(w))
    bad = tmp_path / "bad.json"
    bad.write_text('{"features": ["x"], "coef": [1], "num_layers": 2}')
    with pytest.raises(ValueError, match="not a flexc latency model"):
        LatencyModel.load(str(bad))
    with pytest.raises(ValueError, match="unknown work field"):
        m.max_extra(IterationWork(), 1.0, "tokens", 5)
    assert len(FEATURES) == 8
