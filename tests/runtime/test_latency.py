"""Latency model: recovers known costs, respects budgets, refines online, persists."""
import numpy as np
import pytest

from flexc.runtime.latency import FEATURES, IterationWork, LatencyModel


def _truth(w: IterationWork) -> float:
    return (0.004 + 2e-4 * w.decode_tokens + 1e-4 * w.prefill_tokens + 1e-8 * w.attention_pairs
            + 3e-4 * w.ft_forward_tokens + 6e-4 * w.ft_backward_layer_tokens / 10
            + 2e-3 * w.ft_backward_layers / 10)


def _samples(n, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = IterationWork(decode_tokens=int(rng.integers(0, 64)), prefill_tokens=int(rng.integers(0, 256)),
                          attention_pairs=int(rng.integers(0, 200_000)), ft_forward_tokens=int(rng.integers(0, 256)),
                          ft_backward_layer_tokens=int(rng.integers(0, 5000)),
                          ft_backward_layers=int(rng.integers(0, 10)))
        out.append((w, _truth(w) * (1 + noise * rng.standard_normal())))
    return out


def test_fit_recovers_coefficients():
    """Fitted on exact measurements of a linear cost, the model predicts unseen batches within 1%."""
    m = LatencyModel(num_layers=10).fit(_samples(60))
    for w, t in _samples(20, seed=1):
        assert m.predict(w) == pytest.approx(t, rel=1e-2)


def test_admitted_finetuning_tokens_stay_within_budget():
    """The finetuning tokens the model admits keep the predicted time under the budget, one more does not;
    each costs its marginal compute only (n tokens beside decodes cost n times one token's increment)."""
    m = LatencyModel(num_layers=10).fit(_samples(60))
    base, unit = IterationWork(decode_tokens=16), IterationWork(ft_forward_tokens=1)
    n = m.max_units(base, 0.045, unit, limit=10_000)
    assert 0 < n < 10_000
    assert m.predict(IterationWork(decode_tokens=16, ft_forward_tokens=n)) <= 0.045
    assert m.predict(IterationWork(decode_tokens=16, ft_forward_tokens=n + 1)) > 0.045
    assert m.max_units(IterationWork(decode_tokens=10_000), 0.045, unit, 100) == 0
    one = m.predict(IterationWork(decode_tokens=16, ft_forward_tokens=1)) - m.predict(base)
    assert m.predict(IterationWork(decode_tokens=16, ft_forward_tokens=n)) - m.predict(base) == \
        pytest.approx(n * one, rel=1e-9)


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
    assert len(FEATURES) == 7 and "ft_forward_passes" not in FEATURES
