"""The choice of an encode strategy (gradsae.op.strategy), host-tested with an injected timer:
measured once per bucket and cached on disk, the GRADSAE_STRATEGY override, bucket keys,
corrupt, stale, unwritable and concurrently written caches, strategies that fail, and the
op's entry points handing the choice to the backend. No GPU: the timer is a stand-in that
runs the strategy and reports a made-up time."""

from __future__ import annotations

import json
import warnings
from argparse import Namespace

import pytest
import torch
from oracle import random_sae

import gradsae
from gradsae.errors import GradSAEWarning, InputError
from gradsae.op import Request, get_backend, register_backend, strategy, unregister_backend
from gradsae.stats import LatentStats


class TwoWay:
    """A backend with two strategies that computes with the reference backend and records
    which strategy every call ran."""

    def __init__(self, name="twoway", offered=("fused", "chunked")):
        self.name = name
        self.offered = offered
        self.ran: list[str | None] = []
        self.fail: set[str] = set()

    def unsupported(self, req):
        return None

    def strategies(self, req):
        return self.offered

    def select(self, req):
        self.ran.append(req.strategy)
        if req.strategy in self.fail:
            raise RuntimeError(f"{req.strategy} cannot compile here")
        return get_backend("reference").select(req)

    def influence(self, req):
        self.ran.append(req.strategy)
        return get_backend("reference").influence(req)


class Clock:
    """The injected timer: runs the strategy once, reports ``times[strategy]`` seconds."""

    def __init__(self, **times):
        self.times = times
        self.timed: list[str] = []

    def __call__(self, run, req):
        self.timed.append(req.strategy)
        run()
        return self.times[req.strategy]


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("GRADSAE_STRATEGY_CACHE", raising=False)
    monkeypatch.delenv("GRADSAE_STRATEGY", raising=False)
    monkeypatch.setattr(strategy, "MEASURE_MIN", 0)
    strategy.forget()
    yield tmp_path / "xdg" / "gradsae" / "strategy.json"
    strategy.forget()


def _req(n=5, k=4, activation="topk", dtype=torch.float32, d_sae=64):
    sae = random_sae(8, d_sae, activation, k=k, dtype=dtype)
    x = torch.randn(n, 8, dtype=dtype)
    return Request(x, x, sae, k if activation == "topk" else None)


def test_measured_once_per_bucket_and_cached_on_disk(cache_home):
    b, clock = TwoWay(), Clock(fused=2e-3, chunked=1e-3)
    assert strategy.choose(b, _req(n=5), timer=clock).strategy == "chunked"
    assert clock.timed == ["fused", "chunked"] and b.ran == ["fused", "chunked"]  # each ran under the timer
    doc = json.loads(cache_home.read_text())
    key = strategy.bucket("twoway", _req(n=5), 4)
    assert doc["format"] == strategy.FORMAT and list(doc["decisions"]) == [key]
    entry = doc["decisions"][key]
    assert entry["strategy"] == "chunked" and entry["seconds"] == {"fused": 2e-3, "chunked": 1e-3}
    assert entry["versions"] == strategy.versions()
    # the same bucket (5..8 rows) again: no timing, in this process and the next
    assert strategy.choose(b, _req(n=7), timer=clock).strategy == "chunked"
    strategy.forget()
    assert strategy.choose(b, _req(n=8), timer=clock).strategy == "chunked"
    assert clock.timed == ["fused", "chunked"]
    # another bucket is measured on its own, and kept beside the first
    clock.times = {"fused": 1e-3, "chunked": 3e-3}
    assert strategy.choose(b, _req(n=9), timer=clock).strategy == "fused"
    assert len(json.loads(cache_home.read_text())["decisions"]) == 2


def test_cache_path(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert strategy.cache_path() == tmp_path / ".cache" / "gradsae" / "strategy.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert strategy.cache_path() == tmp_path / "c" / "gradsae" / "strategy.json"
    monkeypatch.setenv("GRADSAE_STRATEGY_CACHE", str(tmp_path / "mine.json"))
    assert strategy.cache_path() == tmp_path / "mine.json"


def test_bucket_keys():
    r = _req(n=5, k=5)
    key = strategy.bucket("triton", r, 5, device="NVIDIA H200 sm_90")
    assert key == "triton/NVIDIA H200 sm_90/float32/topk/k8/d_in8/d_sae64/n8"
    same = [_req(n=n, k=k) for n, k in ((8, 5), (6, 8), (5, 7))]
    assert all(strategy.bucket("triton", q, q.k, device="d") == strategy.bucket("triton", r, 5, device="d")
               for q in same)
    differ = [("triton", _req(n=9, k=5), 5), ("cuda", r, 5), ("triton", _req(n=5, k=9), 9),
              ("triton", _req(n=5, k=5, dtype=torch.bfloat16), 5), ("triton", _req(n=5, d_sae=128), 5),
              ("triton", _req(n=5, activation="jumprelu"), 5)]
    keys = {strategy.bucket(name, q, k, device="d") for name, q, k in differ}
    assert len(keys) == len(differ) and strategy.bucket("triton", r, 5, device="d") not in keys
    assert "/threshold/" in strategy.bucket("triton", _req(activation="relu"), 128, device="d")
    assert strategy.bucket("triton", r, 5).split("/")[1] == "cpu"


def test_threshold_requests_are_timed_at_the_first_capacity():
    b, clock = TwoWay(), Clock(fused=1.0, chunked=2.0)
    seen = []
    real = b.select
    b.select = lambda req: seen.append(req.k) or real(req)
    req = _req(n=5, activation="jumprelu", d_sae=300)
    assert req.k is None
    assert strategy.choose(b, req, timer=clock).strategy == "fused"
    assert seen == [128, 128]  # INITIAL_CAPACITY slots, as the op's first pass


@pytest.mark.parametrize("value,want", [("fused", "fused"), ("chunked", "chunked"), (" Chunked ", "chunked")])
def test_override_is_never_timed(monkeypatch, cache_home, value, want):
    monkeypatch.setenv("GRADSAE_STRATEGY", value)
    b, clock = TwoWay(), Clock(fused=1.0, chunked=1.0)
    assert strategy.choose(b, _req(), timer=clock).strategy == want
    assert clock.timed == [] and not cache_home.exists()


def test_override_auto_measures_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv("GRADSAE_STRATEGY", "auto")
    clock = Clock(fused=2.0, chunked=1.0)
    assert strategy.choose(TwoWay(), _req(), timer=clock).strategy == "chunked" and clock.timed
    monkeypatch.setenv("GRADSAE_STRATEGY", "fastest")
    with pytest.raises(InputError, match="GRADSAE_STRATEGY='fastest' is not a strategy; expected fused, chunked"):
        strategy.choose(TwoWay(), _req(), timer=clock)


def test_override_a_backend_cannot_run_warns_and_runs_its_default(monkeypatch):
    monkeypatch.setenv("GRADSAE_STRATEGY", "fused")
    b = TwoWay(offered=("chunked",))
    with pytest.warns(GradSAEWarning, match="GRADSAE_STRATEGY=fused but backend 'twoway' cannot run it"):
        assert strategy.choose(b, _req(), timer=Clock()).strategy == "chunked"


def test_defaults_without_measurement(monkeypatch, cache_home):
    b = TwoWay(offered=("chunked", "fused"))
    clock = Clock(fused=1.0, chunked=2.0)
    monkeypatch.setattr(strategy, "MEASURE_MIN", 5 * 64 + 1)  # N x d_sae just under it
    assert strategy.choose(b, _req(n=5), timer=clock).strategy == "chunked"
    monkeypatch.setattr(strategy, "MEASURE_MIN", 0)
    assert strategy.choose(TwoWay(offered=("fused",)), _req(), timer=clock).strategy == "fused"
    assert strategy.choose(b, _req(), timer=lambda run, req: None).strategy == "chunked"  # cannot be timed
    assert clock.timed == [] and not cache_home.exists()
    # the default timer cannot time CPU tensors: the default, nothing run, nothing written
    assert strategy.choose(b, _req()).strategy == "chunked"
    assert b.ran == [] and not cache_home.exists()


def test_a_named_strategy_passes_and_must_be_offered():
    b = TwoWay(offered=("chunked",))
    r = _req()
    r.strategy = "chunked"
    assert strategy.choose(b, r, timer=Clock()) is r
    r.strategy = "fused"
    with pytest.raises(InputError, match="cannot run the 'fused' strategy"):
        strategy.choose(b, r, timer=Clock())
    ref = get_backend("reference")  # no strategies: the request passes as it is
    assert strategy.choose(ref, _req(), timer=Clock()).strategy is None


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"format": 99, "decisions": {}}', '{"format": 1}'])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(cache_home, text):
    cache_home.parent.mkdir(parents=True)
    cache_home.write_text(text)
    b, clock = TwoWay(), Clock(fused=1.0, chunked=2.0)
    with pytest.warns(GradSAEWarning, match=f"ignoring the strategy cache {cache_home}"):
        assert strategy.choose(b, _req(), timer=clock).strategy == "fused"
    assert clock.timed == ["fused", "chunked"]
    doc = json.loads(cache_home.read_text())
    assert doc["format"] == strategy.FORMAT and len(doc["decisions"]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        strategy.choose(b, _req(n=100), timer=clock)


def test_entries_of_other_versions_or_strategies_are_measured_again(cache_home):
    key = strategy.bucket("twoway", _req(), 4)
    stale = {"strategy": "fused", "seconds": {}, "versions": {**strategy.versions(), "torch": "0.0"}}
    cache_home.parent.mkdir(parents=True)
    cache_home.write_text(json.dumps({"format": 1, "decisions": {key: stale}}))
    clock = Clock(fused=2.0, chunked=1.0)
    assert strategy.choose(TwoWay(), _req(), timer=clock).strategy == "chunked" and clock.timed
    assert json.loads(cache_home.read_text())["decisions"][key]["versions"] == strategy.versions()
    bogus = {"strategy": "dense", "versions": strategy.versions()}
    cache_home.write_text(json.dumps({"format": 1, "decisions": {key: bogus}}))
    strategy.forget()
    clock.timed.clear()
    assert strategy.choose(TwoWay(), _req(), timer=clock).strategy == "chunked" and clock.timed


def test_writes_merge_with_what_another_process_wrote(cache_home):
    clock = Clock(fused=2.0, chunked=1.0)
    strategy.choose(TwoWay(), _req(n=5), timer=clock)
    # another process adds a decision after this one read the file
    doc = json.loads(cache_home.read_text())
    doc["decisions"]["other/bucket"] = {"strategy": "fused", "versions": strategy.versions()}
    cache_home.write_text(json.dumps(doc))
    strategy.choose(TwoWay(), _req(n=40), timer=clock)
    decisions = json.loads(cache_home.read_text())["decisions"]
    assert len(decisions) == 3 and decisions["other/bucket"]["strategy"] == "fused"
    assert not [p for p in cache_home.parent.iterdir() if p.name != cache_home.name]  # no temporary left


def test_an_unwritable_cache_keeps_decisions_in_memory(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the directory should be
    clock = Clock(fused=2.0, chunked=1.0)
    with pytest.warns(GradSAEWarning, match="cannot write the strategy cache"):
        assert strategy.choose(TwoWay(), _req(), timer=clock).strategy == "chunked"
    assert strategy.choose(TwoWay(), _req(), timer=clock).strategy == "chunked"
    assert clock.timed == ["fused", "chunked"]


def test_a_strategy_that_fails_while_timed_loses(cache_home):
    b = TwoWay()
    b.fail = {"fused"}
    clock = Clock(fused=1.0, chunked=5.0)
    with pytest.warns(GradSAEWarning, match="the fused strategy of backend 'twoway' failed while being timed"):
        assert strategy.choose(b, _req(), timer=clock).strategy == "chunked"
    entry = next(iter(json.loads(cache_home.read_text())["decisions"].values()))
    assert entry["seconds"] == {"chunked": 5.0} and "cannot compile" in entry["errors"]["fused"]
    b2 = TwoWay()
    b2.fail = {"fused", "chunked"}
    with pytest.raises(RuntimeError, match="fused cannot compile"):
        strategy.choose(b2, _req(n=100), timer=clock)


def test_ties_go_to_the_default():
    assert strategy.choose(TwoWay(offered=("chunked", "fused")), _req(),
                           timer=Clock(fused=1.0, chunked=1.0)).strategy == "chunked"


@pytest.fixture
def twoway():
    b = TwoWay()
    register_backend(b)
    yield b
    unregister_backend(b.name)


def test_every_op_entry_point_runs_the_chosen_strategy(monkeypatch, twoway):
    clock = Clock(fused=2.0, chunked=1.0)
    monkeypatch.setattr(strategy, "cuda_timer", clock)  # the op's default timer
    sae = random_sae(8, 64, "topk", k=4)
    x = torch.randn(6, 8)
    out = gradsae.influence(x, x, sae, backend="twoway")
    assert twoway.ran == ["fused", "chunked", "chunked"]  # timed both, then ran the choice
    ref = gradsae.influence(x, x, sae, backend="reference")
    assert torch.equal(out.indices, ref.indices)
    gradsae.encode_sparse(x, sae, backend="twoway")
    gradsae.accumulate_influence(x, x, sae, LatentStats(64), backend="twoway")
    assert twoway.ran[3:] == ["chunked", "chunked"] and clock.timed == ["fused", "chunked"]
    monkeypatch.setenv("GRADSAE_STRATEGY", "fused")
    gradsae.influence(x, x, sae, backend="twoway")
    assert twoway.ran[-1] == "fused"


def test_info_shows_the_override_and_the_decisions(monkeypatch, capsys, cache_home):
    from gradsae.commands import info

    strategy.choose(TwoWay(), _req(), timer=Clock(fused=2e-3, chunked=1e-3))
    info.run(Namespace(json=False))
    out = capsys.readouterr().out
    key = strategy.bucket("twoway", _req(), 4)
    assert "GRADSAE_STRATEGY unset" in out and str(cache_home) in out
    assert f"{key}: chunked (fused 2.000 ms, chunked 1.000 ms)" in out
    monkeypatch.setenv("GRADSAE_STRATEGY", "fused")
    rep = info.collect()["strategy"]
    assert rep["override"] == "fused" and rep["decisions"][key]["strategy"] == "chunked"
    assert rep["decisions"][key]["current"] is True
    info.run(Namespace(json=False))
    assert "GRADSAE_STRATEGY=fused" in capsys.readouterr().out
