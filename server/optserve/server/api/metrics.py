"""Prometheus metrics for one server (`--metrics-port`, or `Server(metrics_port=...)`).

Each `Server` owns a `ServerMetrics` with its own `CollectorRegistry`, so several servers in one
process (tests, notebooks) never share or clash over series. The service calls a handful of hooks
once per request (never per element); gauges that describe the current state (models, steps, bytes
held, device memory) are read from the model store when Prometheus scrapes, so they cost nothing
in between.

Series (all prefixed `optserve_`):
    pushes_total{model,outcome}          outcome: applied, accepted (sync: joined a round),
                                         duplicate (a retry), or the rejecting status (stale pushes
                                         are failed_precondition)
    pulls_total{model,outcome}           outcome: ok, not_modified, or the rejecting status
    requests_rejected_total{rpc,code}    every rejected call of any RPC
    received_bytes_total{model}          gradient payload bytes taken from pushes
    sent_bytes_total{model}              bytes of pull replies
    apply_seconds{model}                 push fully received -> applied (includes waiting for the
                                         model's lock; JAX dispatches asynchronously, so this is the
                                         time to enqueue the update, not to finish it on the device)
    push_staleness_steps{model}          current step minus the push's base_step, when it declared one
    sync_wait_seconds{model}             time a pull (or push-pull) waited for min_step
    waiting_calls, waiting_calls_limit   calls waiting for a step now, and how many may (beyond that
                                         they are refused with RESOURCE_EXHAUSTED)
    checkpoint_seconds{model}, checkpoint_bytes{model}, checkpoint_failures_total{model}
    last_checkpoint_timestamp_seconds{model}, last_checkpoint_step{model}
                                         the model's newest checkpoint (written or restored): when it
                                         was committed (unix time; its age is time() minus this) and
                                         its step; only for models that have one
    models, model_step{model}, model_bytes{model,kind=params|state}
    device_bytes{device}                 bytes of all models held on each device ("cpu:0", "gpu:3"; one
                                         series per device of --devices)
    device_memory_bytes{device,kind}     from jax's memory_stats() where the device reports them (GPU,
                                         TPU); on CPU the models' bytes above are the figure
    compilations_total{kind}             XLA compilations in this process (kind: update_step, a model's
                                         jitted update; other), not counting those the persistent
                                         compilation cache served (core/compilation.py)
    compile_cache_hits_total{kind}       executables read from the persistent compilation cache instead
    compile_seconds_total{kind}          time spent in both
    compile_cache_writes_total           executables written to the persistent compilation cache
    warm_ups_total{outcome}              background compilations of models' steps: compiled, skipped
                                         (a push came first, or the model was deleted), failed
    plus the standard process_* series (resident memory, CPU, open files).

Labels are only ever the names of models that exist (requests naming unknown models are counted
under model=""), so hostile clients cannot grow the label set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from optserve.server.api.status import status_name
from optserve.server.core import compilation

log = logging.getLogger("optserve.metrics")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
PUSH_RPCS = frozenset({"Push", "PushPull", "PushOne", "PushPullOne"})
PULL_RPCS = frozenset({"Pull", "PushPull", "PullOne", "PushPullOne"})


class _StateCollector(Collector):
    """Gauges read from the store at scrape time."""

    def __init__(self, store: Any):
        self.store = store
        self.checkpoints: Any = None  # the CheckpointManager, once the server has one (watch_checkpoints)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        models = self.store.models()
        yield GaugeMetricFamily("optserve_models", "Models held by the server", value=len(models))
        step = GaugeMetricFamily("optserve_model_step", "Updates applied to the model", labels=["model"])
        size = GaugeMetricFamily("optserve_model_bytes", "Bytes held for the model", labels=["model", "kind"])
        epoch = GaugeMetricFamily(
            "optserve_membership_epoch",
            "The model's membership epoch (joins, new sessions, expiries)",
            labels=["model"],
        )
        live = GaugeMetricFamily("optserve_live_workers", "Workers whose lease is live", labels=["model"])
        for m in models:
            step.add_metric([m.name], m.step)
            size.add_metric([m.name, "params"], m.param_bytes)
            size.add_metric([m.name, "state"], m.state_bytes)
            members_epoch, members = m.membership_info()
            epoch.add_metric([m.name], members_epoch)
            live.add_metric([m.name], len(members))
        yield step
        yield size
        when = GaugeMetricFamily(
            "optserve_last_checkpoint_timestamp_seconds",
            "When the model's newest checkpoint was committed (unix time)",
            labels=["model"],
        )
        which = GaugeMetricFamily(
            "optserve_last_checkpoint_step", "Step of the model's newest checkpoint", labels=["model"]
        )
        if self.checkpoints is not None:
            for m in models:
                status = self.checkpoints.describe(m.name)
                if status.last_unix:
                    when.add_metric([m.name], status.last_unix)
                    which.add_metric([m.name], status.last_step)
        yield when
        yield which
        yield epoch
        yield live
        held = GaugeMetricFamily("optserve_device_bytes", "Bytes of all models held on each device", labels=["device"])
        for device, nbytes in zip(self.store.placement.devices, self.store.device_bytes(), strict=True):
            held.add_metric([f"{device.platform}:{device.id}"], nbytes)
        yield held
        memory = GaugeMetricFamily(
            "optserve_device_memory_bytes", "Accelerator memory as the device reports it", labels=["device", "kind"]
        )
        device = self.store.device
        try:
            stats = device.memory_stats() or {}
        except Exception:  # some backends do not implement it
            stats = {}
        for key, kind in (("bytes_in_use", "in_use"), ("peak_bytes_in_use", "peak"), ("bytes_limit", "limit")):
            if key in stats:
                memory.add_metric([str(device), kind], stats[key])
        yield memory


class _CompileCollector(Collector):
    """Compilation counts (core/compilation.py), read at scrape time. They are the process's: a
    second server in the same process reports the same figures."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = compilation.stats()
        for name, doc, values in (
            ("optserve_compilations", "XLA compilations not served by the compilation cache", stats.compilations),
            ("optserve_compile_cache_hits", "Executables read from the persistent compilation cache", stats.cache_hits),
            ("optserve_compile_seconds", "Seconds compiling or reading the compilation cache", stats.seconds),
        ):
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind, value in values.items():
                family.add_metric([kind], value)
            yield family
        yield CounterMetricFamily(
            "optserve_compile_cache_writes",
            "Executables written to the persistent compilation cache",
            value=stats.cache_writes,
        )
        warm_ups = CounterMetricFamily(
            "optserve_warm_ups", "Background compilations of models' update steps", labels=["outcome"]
        )
        for outcome, value in stats.warm_ups.items():
            warm_ups.add_metric([outcome], value)
        yield warm_ups


class ServerMetrics:
    """The metrics of one server, in their own registry."""

    def __init__(self, store: Any):
        self.store = store
        self.registry = CollectorRegistry()
        r = self.registry
        self.pushes = Counter("optserve_pushes", "Pushes by model and outcome", ["model", "outcome"], registry=r)
        self.pulls = Counter("optserve_pulls", "Pulls by model and outcome", ["model", "outcome"], registry=r)
        self.rejected = Counter(
            "optserve_requests_rejected", "Rejected calls by RPC and status", ["rpc", "code"], registry=r
        )
        self.bytes_in = Counter("optserve_received_bytes", "Gradient payload bytes received", ["model"], registry=r)
        self.bytes_out = Counter("optserve_sent_bytes", "Parameter bytes sent by pulls", ["model"], registry=r)
        self.apply_seconds = Histogram(
            "optserve_apply_seconds",
            "Push received -> update applied (dispatched)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.staleness = Histogram(
            "optserve_push_staleness_steps",
            "Steps a push's base_step is behind",
            ["model"],
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.sync_wait = Histogram(
            "optserve_sync_wait_seconds", "Time a pull waited for min_step", ["model"], buckets=WAIT_BUCKETS, registry=r
        )
        self.checkpoint_seconds = Histogram(
            "optserve_checkpoint_seconds", "Checkpoint duration", ["model"], buckets=CHECKPOINT_BUCKETS, registry=r
        )
        self.checkpoint_bytes = Histogram(
            "optserve_checkpoint_bytes",
            "Checkpoint size",
            ["model"],
            buckets=tuple(float(1 << k) for k in range(10, 41, 2)),
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "optserve_checkpoint_failures", "Checkpoints that failed", ["model"], registry=r
        )
        self.waiting_calls = Gauge("optserve_waiting_calls", "Calls waiting for a step", registry=r)
        self.waiting_limit = Gauge("optserve_waiting_calls_limit", "Calls that may wait for a step at once", registry=r)
        self._state = _StateCollector(store)
        r.register(self._state)
        r.register(_CompileCollector())
        compilation.install_listeners()
        ProcessCollector(registry=r)
        self._http: Any = None
        self.port: int | None = None
        self._children: dict[tuple, Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), cached: prometheus_client's labels() locks and builds tuples on
        every call, a measurable share of a small model's round trip when done five times per call."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _model_label(self, model: str | None) -> str:
        # Only existing models become labels: a stream of requests for random names must not grow
        # the number of series without bound.
        return model if model and model in self.store.names() else ""

    def watch_checkpoints(self, checkpoints: Any) -> None:
        """Reports the newest checkpoint of each model (its time and step) from this CheckpointManager."""
        self._state.checkpoints = checkpoints

    # -- hooks called by the service, once per request -----------------------------------------

    def pushed(self, model: str, outcome: str, nbytes: int, seconds: float, staleness: int | None) -> None:
        """A push that got through: applied, accepted into a sync round, or a duplicate."""
        self._child(self.pushes, model, outcome).inc()
        self._child(self.bytes_in, model).inc(nbytes)
        if outcome != "duplicate":
            self._child(self.apply_seconds, model).observe(seconds)
            if staleness is not None:
                self._child(self.staleness, model).observe(staleness)

    def pulled(self, model: str, outcome: str, nbytes: int) -> None:
        self._child(self.pulls, model, outcome).inc()
        if nbytes:
            self._child(self.bytes_out, model).inc(nbytes)

    def waited(self, model: str, seconds: float) -> None:
        self._child(self.sync_wait, model).observe(seconds)

    def failed(self, rpc: str, error: BaseException, *, model: str, pushed: bool) -> None:
        """A call that ends with an error status (or was cancelled by its client). model: the model
        its request named ('' if none yet); pushed: its push was counted (a PushPull's failure after
        that is its pull's)."""
        code = status_name(error)
        self.rejected.labels(rpc, code).inc()
        model = self._model_label(model)
        if rpc in PUSH_RPCS and not pushed:
            self.pushes.labels(model, code).inc()
        elif rpc in PULL_RPCS:
            self.pulls.labels(model, code).inc()

    def checkpoint(self, model: str, seconds: float, nbytes: int | None, ok: bool) -> None:
        """One checkpoint attempt (the checkpoint manager or the SaveCheckpoint RPC reports it)."""
        if ok:
            self.checkpoint_seconds.labels(model).observe(seconds)
            if nbytes is not None:
                self.checkpoint_bytes.labels(model).observe(nbytes)
        else:
            self.checkpoint_failures.labels(model).inc()

    # -- exposition ------------------------------------------------------------------------------

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serves /metrics over HTTP on host:port (0: a free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, self.port, extra={"event": "metrics_started"})
        return self.port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
