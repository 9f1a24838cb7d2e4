"""Compiling models' steps (core/compilation.py; docs/design.md, "Compilation"): the persistent
compilation cache under the checkpoint directory makes a restarted server compile no update step;
a new model's step is compiled once, in the background, and its first push does not compile it
again. Counts are read from the server's metrics endpoint (process-wide compilation counters)."""

from __future__ import annotations

import os
import re
import urllib.request

import numpy as np
import pytest

from optserve.client import Client
from tests.conftest import start_server_with_metrics, stop_server_process, wait_until

SPEC = {"chain": [{"clip_by_global_norm": {"max_norm": 1.0}}, {"adam": {"learning_rate": 1e-3}}]}
PARAMS = {f"layer{i}/w": np.full(8, i, np.float32) for i in range(6)} | {"big": np.zeros(300_000, np.float32)}


def _grads(k: float) -> dict[str, np.ndarray]:
    return {name: np.full(a.shape, 0.01 * (k + 1), np.float32) for name, a in PARAMS.items()}


def _counts(metrics_port: int) -> dict[str, float]:
    """The compilation series, e.g. {'compilations:update_step': 2.0, 'warm_ups:compiled': 2.0}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for name, label, value in re.findall(
        r'^optserve_(compilations|compile_cache_hits|compile_cache_writes|warm_ups)_total(?:\{\w+="(\w+)"\})? (\S+)$',
        text,
        re.M,
    ):
        out[f"{name}:{label}" if label else name] = float(value)
    return out


def _warm_ups_finished(metrics_port: int, n: int) -> bool:
    c = _counts(metrics_port)
    return c["warm_ups:compiled"] + c["warm_ups:skipped"] + c["warm_ups:failed"] >= n


def test_restart_with_the_cache_compiles_no_update_step(tmp_path):
    """A server with checkpoints keeps its compilation cache in DIR/.compile-cache; restarted on the
    same directory, it restores the model, and neither the warm-up nor the first push compiles the
    update step: both are served by the cache."""
    root = str(tmp_path / "ckpt")
    proc, target, metrics = start_server_with_metrics("--checkpoint-dir", root)
    try:
        with Client(target, timeout=120.0) as c:
            m = c.create_model("m", PARAMS, optimizer=SPEC)
            m.push(_grads(0))
            assert m.save() == 1
        # both step variants compiled (and written to the cache) before the server stops
        wait_until(lambda: _warm_ups_finished(metrics, 2), "the model's two warm-ups")
        first = _counts(metrics)
        assert first["warm_ups:compiled"] == 2 and first["compilations:update_step"] == 2, first
        assert first["compile_cache_hits:update_step"] == 0 and first["compile_cache_writes"] > 0, first
    finally:
        code, err = stop_server_process(proc)
    assert code == 0, err
    assert os.listdir(os.path.join(root, ".compile-cache"))

    proc, target, metrics = start_server_with_metrics("--checkpoint-dir", root)
    try:
        with Client(target, timeout=120.0) as c:
            assert [x["name"] for x in c.list_models()] == ["m"]  # the cache directory is not a model
            m = c.model("m")
            assert m.push(_grads(1)) == 2
            pulled = m.pull()
        wait_until(lambda: _warm_ups_finished(metrics, 2), "the restored model's two warm-ups")
        after = _counts(metrics)
        assert after["compilations:update_step"] == 0, after
        # two variants, each read from the cache once (by its warm-up, or by the push that came
        # first): the restored state has the avals the warm-up compiled for
        assert after["compile_cache_hits:update_step"] == 2, after
    finally:
        code, err = stop_server_process(proc)
    assert code == 0, err
    assert "not a model name" not in err  # the cache directory is skipped silently
    assert np.all(np.isfinite(pulled["big"])) and not np.array_equal(pulled["big"], PARAMS["big"])


def test_a_new_models_step_is_compiled_once_in_the_background(tmp_path):
    """Without a cache: the step is compiled by the warm-up once the model exists (the
    metric says so before any push), and the first push reuses it instead of compiling again."""
    proc, target, metrics = start_server_with_metrics("--checkpoint-dir", "")
    try:
        with Client(target, timeout=120.0) as c:
            m = c.create_model("m", PARAMS, optimizer=SPEC)
            wait_until(lambda: _warm_ups_finished(metrics, 2), "the model's two warm-ups")
            before = _counts(metrics)
            assert before["warm_ups:compiled"] == 2 and before["compilations:update_step"] == 2, before
            m.push(_grads(0))
            m.push(_grads(1))
            after = _counts(metrics)
            assert after["compilations:update_step"] == 2, after  # the pushes compiled nothing
            assert after["compile_cache_hits:update_step"] == 0 and after["compile_cache_writes"] == 0, after
    finally:
        code, err = stop_server_process(proc)
    assert code == 0, err


@pytest.mark.parametrize("mode", ["sync"])
def test_a_sync_models_step_is_warmed_for_its_round_means(tmp_path, mode):
    """In sync mode the step gets the round's mean (float32, on the device): the warm-up compiles for
    that, and the round's update compiles no step."""
    proc, target, metrics = start_server_with_metrics("--checkpoint-dir", "")
    try:
        with Client(target, timeout=120.0) as c:
            m = c.create_model("s", PARAMS, optimizer=SPEC, mode=mode, workers=1)
            wait_until(lambda: _warm_ups_finished(metrics, 2), "the model's two warm-ups")
            m.push(_grads(0))
            assert m.info()["step"] == 1
            assert _counts(metrics)["compilations:update_step"] == 2
    finally:
        code, err = stop_server_process(proc)
    assert code == 0, err


@pytest.mark.parametrize("flag, expected", [(None, "DEFAULT"), ("", ""), ("none", ""), ("None", "")])
def test_the_flag_off_and_its_default(flag, expected, tmp_path):
    """`--compile-cache ''` or `none` turns the cache off; without the flag the default is used."""
    import argparse

    from optserve.server import cli

    default = str(tmp_path / "ckpt" / ".compile-cache")
    got = cli.serve.compile_cache_dir(argparse.Namespace(compile_cache=flag), default)
    assert got == (default if expected == "DEFAULT" else expected)
    assert os.path.isdir(default) == (expected == "DEFAULT")  # created only when used


class _FakeJit:
    """A jitted function's stand-in: lower(...).compile() records the call and, if asked, blocks."""

    def __init__(self, block: bool = False):
        import threading

        self.calls = 0
        self.started, self.release = threading.Event(), threading.Event()
        if not block:
            self.release.set()

    def lower(self, *args):
        self.calls += 1
        return self

    def compile(self):
        self.started.set()
        assert self.release.wait(60), "the test never released the compilation"


def test_a_queued_warm_up_is_cancelled_by_the_first_update():
    from optserve.server.core.compilation import WarmUp

    jit = _FakeJit()
    w = WarmUp(jit, (), "model 'x'", lambda: True)
    w.wait()  # queued: the caller compiles itself, now
    assert w.done
    w.run()  # its turn comes later: nothing to do
    assert jit.calls == 0


def test_a_warm_up_of_a_model_no_longer_wanted_is_skipped():
    from optserve.server.core.compilation import WarmUp

    jit = _FakeJit()
    w = WarmUp(jit, (), "model 'x'", lambda: False)
    w.run()
    assert w.done and jit.calls == 0


def test_an_update_waits_for_a_running_warm_up():
    import threading

    from optserve.server.core.compilation import WarmUp

    jit = _FakeJit(block=True)
    w = WarmUp(jit, (), "model 'x'", lambda: True)
    runner = threading.Thread(target=w.run)
    runner.start()
    assert jit.started.wait(60)
    waited = threading.Event()
    waiter = threading.Thread(target=lambda: (w.wait(), waited.set()))
    waiter.start()
    assert not waited.wait(0.2)  # still compiling: the update waits (not a timing bet: it cannot end yet)
    jit.release.set()
    assert waited.wait(60) and w.done and jit.calls == 1
    runner.join(60)
    waiter.join(60)
