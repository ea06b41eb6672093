"""Latency model: recovers known costs, respects budgets, refines online, persists."""
import numpy as np
import pytest

from flexc.runtime.latency import FEATURES, IterationWork, LatencyModel


def _truth(w: IterationWork) -> float:
    return (0.004 + 2e-4 * w.decode_tokens + 1e-4 * w.prefill_tokens + 1e-8 * w.attention_pairs
            + 3e-4 * w.ft_forward_tokens + 6e-4 * w.ft_backward_layer_tokens / 10
            + 2e-3 * w.ft_backward_layers / 10 + 4e-4 * w.ft_loss_tokens + 3e-3 * w.lora_segments
            + 0.02 * (w.forward_tokens > 0) + 0.01 * (w.forward_tokens > 1))


def _samples(n, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = IterationWork(decode_tokens=int(rng.integers(0, 64)), prefill_tokens=int(rng.integers(0, 256)),
                          attention_pairs=int(rng.integers(0, 200_000)), ft_forward_tokens=int(rng.integers(0, 256)),
                          ft_backward_layer_tokens=int(rng.integers(0, 5000)),
                          ft_backward_layers=int(rng.integers(0, 10)), ft_loss_tokens=int(rng.integers(0, 300)),
                          lora_segments=int(rng.integers(0, 4)))
        kind = rng.random()
        if kind < 0.25:                     # backward windows alone: no forward pass
            w = IterationWork(ft_backward_layer_tokens=w.ft_backward_layer_tokens,
                              ft_backward_layers=w.ft_backward_layers, ft_loss_tokens=w.ft_loss_tokens)
        elif kind < 0.4:                    # one decode token (beside the windows)
            w = IterationWork(decode_tokens=1, ft_backward_layer_tokens=w.ft_backward_layer_tokens,
                              ft_backward_layers=w.ft_backward_layers, ft_loss_tokens=w.ft_loss_tokens,
                              lora_segments=min(w.lora_segments, 1))
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
    base = IterationWork(decode_tokens=16)

    def unit(k: int) -> IterationWork:
        return IterationWork(ft_forward_tokens=k)
    n = m.max_fit(base, 0.045, unit, limit=10_000)
    assert 0 < n < 10_000
    assert m.predict(IterationWork(decode_tokens=16, ft_forward_tokens=n)) <= 0.045
    assert m.predict(IterationWork(decode_tokens=16, ft_forward_tokens=n + 1)) > 0.045
    assert m.max_fit(IterationWork(decode_tokens=10_000), 0.045, unit, 100) == 0
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
    assert len(FEATURES) == 11 and "ft_forward_passes" not in FEATURES


def test_drift_is_reported_once_and_followed(caplog):
    """Iterations 2x slower than predicted: within one drift window the model reports the drift (ratio ~2, one
    warning) and predicts within 25%; back at the profiled speed, it clears the state and follows back."""
    m = LatencyModel(num_layers=10, drift_window=16).fit(_samples(40))
    assert m.drift is None
    with caplog.at_level("WARNING", logger="flexc.runtime.latency"):
        for i, (w, t) in enumerate(_samples(16, seed=2)):
            assert m.drift is None, i
            m.observe(w, 2 * t)
        assert m.drift is not None and m.drift.ratio == pytest.approx(2.0, rel=0.01)
        assert m.adaptations == 1
        for w, t in _samples(20, seed=4):
            assert m.predict(w) == pytest.approx(2 * t, rel=0.25)
            m.observe(w, 2 * t)
    assert len([r for r in caplog.records if "profiled time" in r.message]) == 1
    assert m.drift is not None
    for w, t in _samples(40, seed=5):
        m.observe(w, t)
    assert m.drift is None
    w, t = _samples(1, seed=6)[0]
    assert m.predict(w) == pytest.approx(t, rel=0.25)


def test_small_noise_is_not_drift():
    """Observations within +-10% of the predictions (noise) neither report drift nor rescale the model."""
    m = LatencyModel(num_layers=10, drift_window=8).fit(_samples(40))
    for w, t in _samples(64, seed=7, noise=0.05):
        m.observe(w, t)
    assert m.drift is None and m.adaptations == 0


def test_refits_keep_rejected_coefficients():
    """A refit over a window where finetuning forward and decode always come together would price one of them at
    0 (without the check it does); with a check that rejects zero per-token costs, the rejected one keeps its
    value and the rest fit around it, back to the true costs."""
    ft = FEATURES.index("ft_forward_tokens")
    for check in (None, lambda coef: [i for i in (1, ft) if coef[i] <= 0]):
        m = LatencyModel(num_layers=10, window=16, refit_every=8, check=check).fit(_samples(40))
        for k in range(1, 17):
            w = IterationWork(decode_tokens=k, ft_forward_tokens=k)
            m.observe(w, _truth(w))
        if check is None:
            assert min(m.coef[1], m.coef[ft]) == 0
        else:
            assert m.coef[1] == pytest.approx(2e-4, rel=1e-3) and m.coef[ft] == pytest.approx(3e-4, rel=1e-3)
