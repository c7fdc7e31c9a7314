"""GET /metrics: Prometheus text format, written by hand (a few counters do not need a client library).

Values are read from the engine thread's counters without a lock: each is a plain int read at once, so a
scrape may mix two steps, never corrupt a value."""

from __future__ import annotations

from d2moe.server.async_engine import AsyncEngine


def _line(out: list[str], name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")


def render_metrics(engine: AsyncEngine) -> str:
    e = engine.engine
    model, stats = e.model, e.stats
    cache = model.cache.stats
    hits, misses = cache.hits, cache.misses
    hist = model.decoder.width_hist.tolist()
    out: list[str] = []
    reasons = dict(stats.requests_finished)
    _line(out, "d2moe_requests_total", "counter", "Requests finished, by finish reason.",
          [(f'{{reason="{r}"}}', n) for r, n in sorted(reasons.items())] or [('{reason="stop"}', 0)])
    _line(out, "d2moe_prompt_tokens_total", "counter", "Prompt tokens accepted.", [("", stats.prompt_tokens)])
    _line(out, "d2moe_generation_tokens_total", "counter", "Tokens generated.", [("", stats.generation_tokens)])
    _line(out, "d2moe_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
          [("", float(round(stats.tokens_per_second(), 3)))])
    _line(out, "d2moe_queue_depth", "gauge", "Requests waiting for a KV slot.", [("", e.queue_depth)])
    _line(out, "d2moe_running_requests", "gauge", "Requests holding a KV slot.", [("", e.running)])
    _line(out, "d2moe_pending_requests", "gauge", "Requests accepted by the HTTP server and not finished.",
          [("", engine.pending)])
    _line(out, "d2moe_batch_size", "gauge", "Sequences in the last engine step.", [("", stats.last_batch_size)])
    _line(out, "d2moe_engine_steps_total", "counter", "Engine steps run.", [("", stats.steps)])
    _line(out, "d2moe_expert_cache_hits_total", "counter", "Expert demands served from the cache.", [("", hits)])
    _line(out, "d2moe_expert_cache_misses_total", "counter", "Expert demands that needed a read.", [("", misses)])
    _line(out, "d2moe_expert_cache_hit_rate", "gauge", "hits / (hits + misses) since start.",
          [("", float(round(hits / (hits + misses), 6)) if hits + misses else 0.0)])
    _line(out, "d2moe_expert_bytes_read_total", "counter", "Expert bytes read from the store.",
          [("", model.expert_bytes_read())])
    _line(out, "d2moe_expert_widths_total", "counter", "(token, chosen expert) pairs computed at each width.",
          [(f'{{bits="{b}"}}', int(n)) for b, n in enumerate(hist) if n and b >= 2])
    if e.prefix is not None:
        p = e.prefix.stats
        _line(out, "d2moe_prefix_cache_hits_total", "counter", "Prompts that reused cached prefix chunks.",
              [("", p.hits)])
        _line(out, "d2moe_prefix_cache_misses_total", "counter", "Prompts that found no cached prefix.",
              [("", p.misses)])
        _line(out, "d2moe_prefix_cache_reused_tokens_total", "counter",
              "Prompt positions copied from the prefix cache instead of computed.", [("", p.reused_tokens)])
        _line(out, "d2moe_prefix_cache_positions", "gauge", "KV positions the prefix cache holds.",
              [("", e.prefix.used)])
    return "\n".join(out) + "\n"
