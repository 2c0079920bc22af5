"""Prometheus text counters for `/metrics`, named as TGI names them so existing dashboards keep working."""

from __future__ import annotations

import time
from collections import Counter


class ServerMetrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.sums: Counter[str] = Counter()

    def success(self, job, result) -> None:
        now = time.monotonic()
        self.counts["success"] += 1
        self.sums["generated_tokens"] += len(result.tokens)
        self.sums["input_length"] += result.prompt_tokens
        self.sums["duration"] += now - job.submitted_at
        self.sums["queue_duration"] += max(0.0, job.started_at - job.submitted_at)
        self.sums["inference_duration"] += now - job.started_at

    def failure(self, kind: str) -> None:
        self.failures[kind] += 1

    def render(self, engine: dict[str, int]) -> str:
        done = self.counts["success"]
        lines = [
            "# TYPE tgi_request_count counter", f"tgi_request_count {done + sum(self.failures.values())}",
            "# TYPE tgi_request_success counter", f"tgi_request_success {done}",
            "# TYPE tgi_request_failure counter"]
        lines += [f'tgi_request_failure{{err="{kind}"}} {n}' for kind, n in sorted(self.failures.items())]
        for name, kind in (("generated_tokens", ""), ("input_length", ""), ("duration", "_seconds"),
                           ("queue_duration", "_seconds"), ("inference_duration", "_seconds")):
            metric = f"tgi_request_{name}"
            lines += [f"# TYPE {metric} summary", f"{metric}_sum {self.sums[name]:.6g}", f"{metric}_count {done}"]
        lines += ["# TYPE tgi_queue_size gauge", f"tgi_queue_size {engine['queue_size']}",
                  "# TYPE tgi_batch_current_size gauge", f"tgi_batch_current_size {engine['batch_size']}",
                  "# TYPE idefics_requests_in_flight gauge", f"idefics_requests_in_flight {engine['in_flight']}",
                  "# TYPE idefics_decode_steps counter", f"idefics_decode_steps {engine['steps']}"]
        return "\n".join(lines) + "\n"
