"""Prometheus metrics of one server, named as vLLM's so its dashboards adapt by replacing ``vllm:`` with ``flexc:``.

Each :class:`ServerMetrics` has its own ``CollectorRegistry`` (never the
process-global default), so two servers in one process (tests) do not collide.
The engine worker writes request and iteration metrics (prometheus_client is
thread-safe); ``GET /metrics`` renders the registry.

Inference (label ``model_name``: the base model's id):
``flexc:time_to_first_token_seconds``, ``flexc:inter_token_latency_seconds``,
``flexc:e2e_request_latency_seconds`` (histograms), ``flexc:num_requests_running``,
``flexc:num_requests_waiting``, ``flexc:kv_cache_usage_perc`` (gauges, the last
0..1), ``flexc:prompt_tokens_total``, ``flexc:generation_tokens_total``,
``flexc:request_success_total{finished_reason}`` (counters),
``flexc:slo_attainment`` (finished requests whose TTFT and TPOT met the SLOs).
Finetuning (label ``job_id``): ``flexc:finetune_step``, ``flexc:finetune_total_steps``,
``flexc:finetune_loss``, ``flexc:finetune_tokens_per_second``,
``flexc:finetune_trained_tokens``; ``flexc:adapters_resident``.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                960.0, 1920.0, 7680.0)


class ServerMetrics:
    """The metrics of one server process, in their own registry."""

    def __init__(self, model_name: str, tpot_slo: float, ttft_slo: float):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.tpot_slo = tpot_slo
        self.ttft_slo = ttft_slo
        reg, m = self.registry, ["model_name"]
        self.ttft = Histogram("flexc:time_to_first_token_seconds", "Time to first token, queueing included.", m,
                              buckets=_TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("flexc:inter_token_latency_seconds", "Time between two output tokens of a request.", m,
                             buckets=_ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("flexc:e2e_request_latency_seconds", "Arrival to last token.", m,
                             buckets=_E2E_BUCKETS, registry=reg)
        self.running = Gauge("flexc:num_requests_running", "Requests in the running batch.", m, registry=reg)
        self.waiting = Gauge("flexc:num_requests_waiting", "Requests waiting to be scheduled.", m, registry=reg)
        self.kv_usage = Gauge("flexc:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", m,
                              registry=reg)
        self.prompt_tokens = Counter("flexc:prompt_tokens", "Prompt tokens of admitted requests.", m, registry=reg)
        self.generation_tokens = Counter("flexc:generation_tokens", "Generated tokens.", m, registry=reg)
        self.success = Counter("flexc:request_success", "Finished requests by finish reason.",
                               m + ["finished_reason"], registry=reg)
        self.slo = Gauge("flexc:slo_attainment", "Share of finished requests whose TTFT and TPOT met the SLOs.", m,
                         registry=reg)
        self.adapters = Gauge("flexc:adapters_resident", "LoRA adapters resident in the engine.", m, registry=reg)
        j = ["model_name", "job_id"]
        self.ft_step = Gauge("flexc:finetune_step", "Optimizer steps a fine-tuning job has taken.", j, registry=reg)
        self.ft_total = Gauge("flexc:finetune_total_steps", "Optimizer steps the job will take.", j, registry=reg)
        self.ft_loss = Gauge("flexc:finetune_loss", "Training loss of the job's last step.", j, registry=reg)
        self.ft_tps = Gauge("flexc:finetune_tokens_per_second", "Training tokens per second of the job.", j,
                            registry=reg)
        self.ft_tokens = Gauge("flexc:finetune_trained_tokens", "Tokens the job has trained on.", j, registry=reg)
        self._finished = 0
        self._met = 0

    # ------------------------------------------------------------------ written by the engine worker
    def request_admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)

    def token(self, first: bool, since: float) -> None:
        """One generated token; ``since``: seconds from arrival (first) or from the previous token."""
        self.generation_tokens.labels(self.model_name).inc()
        (self.ttft if first else self.itl).labels(self.model_name).observe(since)

    def request_finished(self, reason: str, e2e: float, ttft: float, tpot: float) -> None:
        self.success.labels(self.model_name, reason).inc()
        if reason == "abort":
            return
        self.e2e.labels(self.model_name).observe(e2e)
        self._finished += 1
        self._met += ttft <= self.ttft_slo and tpot <= self.tpot_slo
        self.slo.labels(self.model_name).set(self._met / self._finished)

    def engine_state(self, running: int, waiting: int, kv_usage: float, adapters: int) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)
        self.kv_usage.labels(self.model_name).set(kv_usage)
        self.adapters.labels(self.model_name).set(adapters)

    def job_progress(self, job_id: str, *, step: int, total_steps: int, loss: float | None, tokens_per_second: float,
                     trained_tokens: int) -> None:
        labels = (self.model_name, job_id)
        self.ft_step.labels(*labels).set(step)
        self.ft_total.labels(*labels).set(total_steps)
        if loss is not None:
            self.ft_loss.labels(*labels).set(loss)
        self.ft_tps.labels(*labels).set(tokens_per_second)
        self.ft_tokens.labels(*labels).set(trained_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
