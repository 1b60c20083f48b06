"""The server's Prometheus metrics, written in the text exposition format (no client library needed)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Callable

LATENCY_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Upper bounds (seconds) of the latency and time-to-first-token histograms."""


class Histogram:
    """A cumulative histogram over :data:`LATENCY_BUCKETS`."""

    def __init__(self) -> None:
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(LATENCY_BUCKETS, self.counts)]
        return [*out, f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum}", f"{name}_count {self.total}"]


class Metrics:
    """Requests by endpoint and status, tokens, model calls, requests in flight, latency and TTFT. Thread-safe."""

    def __init__(self, in_flight: Callable[[], int]) -> None:
        self._lock = threading.Lock()
        self.in_flight = in_flight
        self.requests: Counter[tuple[str, int]] = Counter()
        self.tokens: Counter[str] = Counter()
        self.model_calls = 0
        self.latency = Histogram()
        self.ttft = Histogram()

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def finished(self, prompt_tokens: int, completion_tokens: int, model_calls: int, latency_s: float) -> None:
        with self._lock:
            self.tokens["prompt"] += prompt_tokens
            self.tokens["completion"] += completion_tokens
            self.model_calls += model_calls
            self.latency.observe(latency_s)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def render(self) -> str:
        """The exposition text."""
        with self._lock:
            lines = ["# HELP nabla_requests_total Requests answered, by endpoint and HTTP status.", "# TYPE nabla_requests_total counter"]
            lines += [f'nabla_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP nabla_tokens_total Prompt and completion tokens of finished requests.", "# TYPE nabla_tokens_total counter"]
            lines += [f'nabla_tokens_total{{kind="{k}"}} {self.tokens[k]}' for k in ("prompt", "completion")]
            lines += ["# HELP nabla_model_calls_total Policy and reward passes of finished requests.", "# TYPE nabla_model_calls_total counter"]
            lines += [f"nabla_model_calls_total {self.model_calls}"]
            lines += ["# HELP nabla_requests_in_flight Requests admitted and not yet answered (queue depth).", "# TYPE nabla_requests_in_flight gauge"]
            lines += [f"nabla_requests_in_flight {self.in_flight()}"]
            lines += ["# HELP nabla_request_latency_seconds Time from admission to the last byte.", "# TYPE nabla_request_latency_seconds histogram"]
            lines += self.latency.lines("nabla_request_latency_seconds")
            lines += ["# HELP nabla_time_to_first_token_seconds Time from admission to the first text.", "# TYPE nabla_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("nabla_time_to_first_token_seconds")
        return "\n".join(lines) + "\n"
