"""Prometheus metrics of one ingress replica.

Latencies are measured here, where the client's clock is: from a request's arrival at the ingress to
the token events the router streams back. Events are coalesced (several tokens each), so the
inter-token latency spreads an event's gap evenly over its tokens. Queue time is the router's own
measure (arrival at the router to its first prefill chunk), carried on the first event, plus a later choice's wait
in the ingress for its first choice's first token.
Per-mesh state (slots, KV blocks per mesh and per KV group, prefix cache, preemptions, up/down) is read
from the router at scrape time, so every ingress replica reports the same, current, values for it. A scrape through
the load balancer reaches one ingress replica: it hands its own families to the router with that stats call and
gets the other replicas' back (each as of its own last scrape), so every scrape shows every replica's series.

The figures vLLM also exports go out a second time under vLLM's names (VLLM_NAMES), with its `model_name`
label, so that dashboards, alerts and autoscalers written for vLLM (its Grafana dashboard, llm-d, KEDA on
vllm:num_requests_waiting) read meshserve unchanged. The copy is made at scrape time: nothing more per token.
"""
from __future__ import annotations

import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from scheduler.work import TokenEvent

# vLLM's buckets (vllm/v1/metrics/loggers.py @005a810b); those of the latencies and token gaps also finer below,
# where a Galaxy's figures lie (a 14 ms step, a 60 ms prefill). A 128k prompt's first token takes ~100 s there,
# past the 80 s these stopped at.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
                    15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                      0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# vLLM's build_1_2_5_buckets(max_model_len) for per-request token counts, at the Galaxy's 128k context
_TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5) if m * 10**e <= 131072)
# vLLM's FinishReason values (and its repetition detection's): each series exists from the start, at 0, as there
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
REJECT_REASONS = ("queue_full", "unavailable")  # why an API request was refused for want of capacity
# meshserve family -> vLLM's name for the same figure (vLLM v1's PrometheusStatLogger, vllm/v1/metrics/loggers.py;
# docs.vllm.ai, "Production Metrics"). vLLM counts prefix-cache queries and hits in tokens, as meshserve does.
VLLM_NAMES = {
    "meshserve_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "meshserve_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "meshserve_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "meshserve_request_queue_time_seconds": "vllm:request_queue_time_seconds",
    "meshserve_request_prefill_time_seconds": "vllm:request_prefill_time_seconds",
    "meshserve_request_decode_time_seconds": "vllm:request_decode_time_seconds",
    "meshserve_request_inference_time_seconds": "vllm:request_inference_time_seconds",
    "meshserve_request_time_per_output_token_seconds": "vllm:request_time_per_output_token_seconds",
    "meshserve_request_prompt_tokens": "vllm:request_prompt_tokens",
    "meshserve_request_generation_tokens": "vllm:request_generation_tokens",
    "meshserve_request_max_num_generation_tokens": "vllm:request_max_num_generation_tokens",
    "meshserve_prompt_tokens": "vllm:prompt_tokens",
    "meshserve_generation_tokens": "vllm:generation_tokens",
    "meshserve_requests": "vllm:request_success",
    "meshserve_num_requests_running": "vllm:num_requests_running",
    "meshserve_num_requests_waiting": "vllm:num_requests_waiting",
    "meshserve_kv_cache_usage_ratio": "vllm:kv_cache_usage_perc",
    "meshserve_prefix_cache_queries_tokens": "vllm:prefix_cache_queries",
    "meshserve_prefix_cache_hits_tokens": "vllm:prefix_cache_hits",
    "meshserve_num_preemptions": "vllm:num_preemptions",
}
_VLLM_LABELS = {"finish_reason": "finished_reason"}  # vLLM's request_success label


DEFERRED = "meshserve_num_requests_deferred"
# Another replica's count of deferred choices is shown only this long after its last scrape: the other families it
# reports are counts and histograms, right however old, but this gauge, added to num_requests_waiting, which
# autoscalers read, would show a replica gone (or not scraped lately) holding a backlog long over.
DEFERRED_REPORT_TTL_S = 60.0


class Metrics:
    def __init__(self, ingress: str = "local", model_name: str = "") -> None:
        """`ingress`: this replica's name, the `ingress` label of every family it measures itself. With several
        ingress replicas a scrape through the load balancer reaches one of them: without the label their
        counters would take turns under one series, which then seems to reset at every scrape. `model_name`:
        the served model's name, the `model_name` label of the vLLM-named copies."""
        self.registry = CollectorRegistry()
        self.ingress = ingress
        self.model_name = model_name

        def histogram(name, doc, buckets):  # in no registry: collect() yields them, with the other replicas' samples
            return Histogram(name, doc, labelnames=["ingress"], buckets=buckets, registry=None)

        ttft = histogram("meshserve_time_to_first_token_seconds", "Arrival at the ingress to the first token.",
                         _TTFT_BUCKETS)
        inter_token = histogram("meshserve_inter_token_latency_seconds", "Gap between consecutive output tokens.",
                                _TOKEN_GAP_BUCKETS)
        e2e = histogram("meshserve_e2e_request_latency_seconds", "Arrival at the ingress to the last token.",
                        _LATENCY_BUCKETS)
        queue = histogram("meshserve_request_queue_time_seconds",
                          "Arrival at the router to the first scheduled prefill chunk (a later choice held in "
                          "the ingress: from its arrival there).", _LATENCY_BUCKETS)
        # Per finished request, as vLLM's dashboard reads them (its prefill, decode, TPOT and length panels)
        prefill = histogram("meshserve_request_prefill_time_seconds", "First prefill chunk scheduled to the first "
                            "token (time to first token less the queue time).", _LATENCY_BUCKETS)
        decode = histogram("meshserve_request_decode_time_seconds", "First token to the last.", _LATENCY_BUCKETS)
        inference = histogram("meshserve_request_inference_time_seconds",
                              "First prefill chunk scheduled to the last token (prefill + decode).", _LATENCY_BUCKETS)
        tpot = histogram("meshserve_request_time_per_output_token_seconds", "A request's decode time over its "
                         "tokens after the first (0 with one token or none, as vLLM records it).", _TOKEN_GAP_BUCKETS)
        request_prompt = histogram("meshserve_request_prompt_tokens", "A finished request's prompt tokens.",
                                   _TOKEN_COUNT_BUCKETS)
        request_generation = histogram("meshserve_request_generation_tokens", "A finished request's generated "
                                       "tokens.", _TOKEN_COUNT_BUCKETS)
        max_generation = histogram("meshserve_request_max_num_generation_tokens", "The most tokens one of an API "
                                   "request's n choices generated (per prompt of a batch), once all have finished.",
                                   _TOKEN_COUNT_BUCKETS)
        prompt_tokens = Counter("meshserve_prompt_tokens", "Prompt tokens, counted when the first token comes (as "
                                "vLLM counts them: once prefilled), or when a request ends without one but not "
                                "aborted.", ["ingress"], registry=None)
        generation_tokens = Counter("meshserve_generation_tokens", "Generated tokens.", ["ingress"], registry=None)
        self.requests = Counter("meshserve_requests", "Finished requests.", ["ingress", "finish_reason"],
                                registry=None)
        self.rejected = Counter("meshserve_requests_rejected", "API requests refused before they ran, once each "
                                "whatever their choices: queue_full (429), unavailable (503: no live mesh or "
                                "router).", ["ingress", "reason"], registry=None)
        # vLLM counts all n children of a request as waiting at once; the later choices of a long prompt wait here, in
        # no router queue, for the first's first token (OpenAIServer.deltas): num_requests_waiting counts them too
        deferred = Gauge(DEFERRED, "Later choices (n > 1) of a long prompt held in the "
                         "ingress until their first choice's first token.", ["ingress"], registry=None)
        per_request = (prefill, decode, inference, tpot, request_prompt, request_generation, max_generation)
        self._own = (ttft, inter_token, e2e, queue, prompt_tokens, generation_tokens, *per_request, deferred,
                     self.requests, self.rejected)
        (self.ttft, self.inter_token, self.e2e, self.queue, self.prompt_tokens, self.generation_tokens, self.prefill,
         self.decode, self.inference, self.tpot, self.request_prompt, self.request_generation,
         self.max_generation, self.deferred) = (family.labels(ingress) for family in self._own[:-2])
        for reason in FINISH_REASONS:
            self.requests.labels(ingress, reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(ingress, reason)
        self._meshes: list[dict] = []
        self._router_up = False
        self._held = 0
        self._others: dict[str, list] = {}  # the other ingress replicas' report(), by name, from the router
        self._other_ages: dict[str, float] = {}  # how old each is, in seconds
        self._shown: dict[str, list] | None = None  # this replica's own samples as this scrape reported them
        self.registry.register(self)

    def start(self, num_prompt_tokens: int, arrival: float, choices: Choices | None = None,
              held_s: float = 0.0) -> RequestTimer:
        """The timer of one router request; `choices`: the group of the API request's n choices it is one of;
        `held_s`: how long it waited in the ingress before it went to the router (a later choice, RequestTimer)."""
        return RequestTimer(self, num_prompt_tokens, arrival, choices or Choices(1), held_s)

    def report(self) -> tuple[str, list]:
        """This replica's name and own families as plain data (name, samples), for the router to hand to the
        other replicas' scrapes."""
        return self.ingress, [(family.name, [(s.name, s.labels, s.value) for s in family.samples])
                              for collector in self._own for family in collector.collect()]

    def render(self, router_stats: dict | None, report: tuple[str, list] | None = None) -> bytes:
        """The exposition text, with the per-mesh families taken from `router_stats` (None: the router did not
        answer; meshserve_router_up 0 and no mesh families, as their state is unknown), and the other ingress
        replicas' own families its `ingress_families` holds. `report`: the report() handed to the router with this
        scrape's stats call, whose values this replica's own families show: counted live, they took in what came
        while the call was out, and the next scrape, of another replica, showed them lower (from the router):
        Prometheus takes any decrease of a counter for a restart."""
        self._shown = dict(report[1]) if report is not None else None
        self._router_up = router_stats is not None
        self._meshes = router_stats["meshes"] if router_stats else []
        self._held = router_stats.get("held", 0) if router_stats else 0
        self._others = router_stats.get("ingress_families", {}) if router_stats else {}
        self._other_ages = router_stats.get("ingress_report_age_s", {}) if router_stats else {}
        return generate_latest(self.registry)

    def collect(self):
        """The per-mesh families (prometheus_client calls this during generate_latest)."""
        yield GaugeMetricFamily("meshserve_router_up", "1 when the router answered this scrape's stats call.",
                                value=float(self._router_up))

        def family(kind, name, doc):
            return kind(name, doc, labels=["mesh"])

        running = family(GaugeMetricFamily, "meshserve_num_requests_running", "Requests holding a decode slot.")
        waiting = family(GaugeMetricFamily, "meshserve_num_requests_waiting",
                         "Requests queued for a slot; mesh=\"\": held by the router while no live mesh can take them, "
                         "or (with an ingress label) later choices held in that ingress replica "
                         "(num_requests_deferred).")
        used = family(GaugeMetricFamily, "meshserve_kv_blocks_used", "KV blocks held by requests.")
        total = family(GaugeMetricFamily, "meshserve_kv_blocks_total", "KV blocks of the mesh.")
        usage = family(GaugeMetricFamily, "meshserve_kv_cache_usage_ratio", "Fraction of KV blocks in use.")
        queried = family(CounterMetricFamily, "meshserve_prefix_cache_queries_tokens",
                         "Prompt tokens looked up in the prefix cache (at a request's first admission; "
                         "not a preempted one's recompute).")
        hits = family(CounterMetricFamily, "meshserve_prefix_cache_hits_tokens",
                      "Prompt tokens found in the prefix cache.")
        hit_rate = family(GaugeMetricFamily, "meshserve_prefix_cache_hit_rate",
                          "Prefix cache hits / queries, in tokens, since start.")
        preempted = family(CounterMetricFamily, "meshserve_num_preemptions", "Sequences preempted for KV blocks.")
        up = family(GaugeMetricFamily, "meshserve_mesh_up", "1 while the mesh is live, 0 while it is down.")
        stalled = family(GaugeMetricFamily, "meshserve_mesh_stalled",
                         "1 while the live mesh has sent nothing past its stall time with work out: new requests go "
                         "around it until it answers, or fails at its deadline.")
        failovers = family(CounterMetricFamily, "meshserve_mesh_failovers",
                           "Times the mesh failed and its requests were moved (not its replica's planned stops).")
        stops = family(CounterMetricFamily, "meshserve_mesh_stops",
                       "Times the mesh's replica stopped on purpose (a redeploy, a scale-down) and its requests were "
                       "moved: not a failure.")
        migrated = family(CounterMetricFamily, "meshserve_requests_migrated",
                          "Requests moved off the mesh when it failed, counted once placed on a mesh again (not "
                          "those that ended instead: held past no_mesh_wait_s, their client gone, failed on too many "
                          "meshes).")
        groups = family(GaugeMetricFamily, "meshserve_kv_groups", "Independent KV caches of the mesh (mesh columns).")
        group_used = GaugeMetricFamily("meshserve_kv_group_blocks_used", "KV blocks held by requests, per KV group.",
                                       labels=["mesh", "group"])
        group_total = GaugeMetricFamily("meshserve_kv_group_blocks_total", "KV blocks of one KV group.",
                                        labels=["mesh", "group"])
        group_running = GaugeMetricFamily("meshserve_kv_group_num_requests_running",
                                          "Requests holding a decode slot of the KV group.", labels=["mesh", "group"])
        for m in self._meshes:
            label = [m["name"]]
            groups.add_metric(label, m.get("kv_groups", 1))
            for g in m.get("groups", ()):
                group_label = [m["name"], str(g["group"])]
                group_used.add_metric(group_label, g["blocks_used"])
                group_total.add_metric(group_label, g["blocks_total"])
                group_running.add_metric(group_label, g["running"])
            up.add_metric(label, int(m.get("up", True)))
            stalled.add_metric(label, int(m.get("stalled", False)))
            failovers.add_metric(label, m.get("failovers", 0))
            stops.add_metric(label, m.get("stops", 0))
            migrated.add_metric(label, m.get("requests_migrated", 0))
            running.add_metric(label, m["running"])
            waiting.add_metric(label, m["waiting"])
            used.add_metric(label, m["blocks_used"])
            total.add_metric(label, m["blocks_total"])
            usage.add_metric(label, m["blocks_used"] / max(m["blocks_total"], 1))
            queried.add_metric(label, m["prefix_query_tokens"])
            hits.add_metric(label, m["prefix_hit_tokens"])
            hit_rate.add_metric(label, m["prefix_hit_tokens"] / max(m["prefix_query_tokens"], 1))
            preempted.add_metric(label, m["preemptions"])
        if self._router_up:  # a failover's or a router start's backlog, which dashboards and autoscalers must see
            waiting.add_metric([""], self._held)
        families = (running, waiting, used, total, usage, queried, hits, hit_rate, preempted, up, stalled, failovers,
                    stops, migrated, groups, group_used, group_total, group_running)
        own = [family for collector in self._own for family in collector.collect()]
        if self._shown is not None:  # as reported (render)
            for family in own:
                family.samples = []
                for sample in self._shown.get(family.name, ()):
                    family.add_sample(*sample)
        by_name = {family.name: family for family in own}
        for name, reported in self._others.items():
            if name == self.ingress:
                continue
            for family_name, samples in reported:
                if family_name == DEFERRED and self._other_ages.get(name, math.inf) > DEFERRED_REPORT_TTL_S:
                    continue  # a gauge: a replica gone, or not scraped lately, would show a backlog long over
                if (family := by_name.get(family_name)) is not None:
                    for sample in samples:
                        family.add_sample(*sample)
        for sample in by_name[DEFERRED].samples:  # this replica's now, the others' as of their last scrape
            waiting.add_sample(waiting.name, {"mesh": "", **sample.labels}, sample.value)
        yield from families
        yield from own
        yield from (self._as_vllm(family) for family in (*own, *families) if family.name in VLLM_NAMES)

    def _as_vllm(self, family: Metric) -> Metric:
        """`family` under vLLM's name, its labels as vLLM names them, plus `model_name`."""
        name = VLLM_NAMES[family.name]
        copy = Metric(name, family.documentation, family.type)
        for sample in family.samples:
            labels = {_VLLM_LABELS.get(k, k): v for k, v in sample.labels.items()}
            labels["model_name"] = self.model_name
            copy.add_sample(name + sample.name[len(family.name):], labels, sample.value, sample.timestamp)
        return copy


class Choices:
    """The n choices of one prompt of an API request: vLLM's request_max_num_generation_tokens is observed once
    for them, when the last one finishes (a choice refused before it ran never does, nor then the group)."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.most = 0

    def finished(self, metrics: Metrics, generated: int) -> None:
        self.left -= 1
        self.most = max(self.most, generated)
        if self.left == 0:
            metrics.max_generation.observe(self.most)


class RequestTimer:
    """The latency marks of one router request, fed with its token events as they arrive."""

    def __init__(self, metrics: Metrics, num_prompt_tokens: int, arrival: float, choices: Choices,
                 held_s: float = 0.0) -> None:
        self.metrics = metrics
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival = arrival  # time.perf_counter() at the ingress
        self.choices = choices
        # A later choice's wait in the ingress for the first's first token is queue time, as vLLM queues n children at
        # once (num_requests_waiting counts it): not prefill time, which is what is left of the time to first token
        self.held_s = held_s
        self.queue_time = 0.0  # held_s + the router's, from its first event
        self.first_token: float | None = None
        self.last_token: float | None = None  # None: no token yet, so its prompt is not counted yet
        self.generated = 0

    def on_event(self, event: TokenEvent, n: int) -> None:
        """`n`: the event's tokens the answer took: those after an end the ingress found (a stop string, a
        repetition) are dropped, and usage does not count them.

        The first event gives no inter-token gap, however many tokens it carries, as vLLM records none for a request's
        prefill output (IterationStats.update_from_output): tokens coalesced behind the first reach here with it, their
        steps' time is in the time to first token, and a gap of 0 for each would pull the ITL histogram down.

        Timed when the event reached the replica (`received`), not when it was read: a client that stopped reading
        holds its events unread (EventQueue), and vLLM times tokens as its engine makes them, whoever reads."""
        now = event.arrived
        m = self.metrics
        if event.queue_time_s is not None:
            self.queue_time = self.held_s + event.queue_time_s
            m.queue.observe(self.queue_time)
        if n == 0:
            return
        if self.last_token is None:
            m.ttft.observe(now - self.arrival)
            m.prompt_tokens.inc(self.num_prompt_tokens)
            self.first_token = now
        else:
            gap = (now - self.last_token) / n
            for _ in range(n):
                m.inter_token.observe(gap)
        self.last_token = now
        self.generated += n
        m.generation_tokens.inc(n)

    def finish(self, finish_reason: str, at: float | None = None) -> None:
        """`at`: when the last event reached the replica (TokenEvent.received; None: now)."""
        m = self.metrics
        m.e2e.observe((time.perf_counter() if at is None else at) - self.arrival)
        if self.last_token is None and finish_reason != "abort":  # ended without a token, having run
            m.prompt_tokens.inc(self.num_prompt_tokens)
        m.requests.labels(m.ingress, finish_reason).inc()
        m.request_prompt.observe(self.num_prompt_tokens)
        m.request_generation.observe(self.generated)
        self.choices.finished(m, self.generated)
        if self.first_token is not None:  # the phases of a request that ran (vLLM's: scheduled, first, last token)
            prefill = max(self.first_token - self.arrival - self.queue_time, 0.0)
            decode = self.last_token - self.first_token
            m.prefill.observe(prefill)
            m.decode.observe(decode)
            m.inference.observe(prefill + decode)
            m.tpot.observe(decode / (self.generated - 1) if self.generated > 1 else 0.0)
