"""Crash-safe resume: SIGKILL a real scoring process mid-run, resume it, and get exactly the
results of an uninterrupted run."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

import gradsae
from gradsae.corpus.resume import RunInterrupted, RunIOError, checkpoint_path, load_checkpoint
from gradsae.errors import InputError

TESTS = Path(__file__).resolve().parent
HOOK = "blocks.1.hook_resid_post"
RUN = dict(hook=HOOK, max_length=12, batch_tokens=24, top_n=3, context=2, progress=False)

WORKER = r"""
import json, sys, time
sys.path.insert(0, {tests!r})
import tiny_models as tm
from oracle import random_sae
import gradsae

a = json.loads(sys.argv[1])
model = tm.model("gpt2", d=32, layers=2, seed=a["seed"], scale=3.0)
sae = random_sae(32, 64, "topk", k=4, seed=a["seed"] + 1)
# slow each batch down so the parent can kill the run in the middle (results are unaffected;
# a hook on a block, since hooks on the model itself make gradsae run the model's own forward)
model.transformer.h[0].register_forward_pre_hook(lambda *args: time.sleep(0.15))
gradsae.score_corpus(model, sae, a["data"], tokenizer=tm.tokenizer(), out=a["out"], checkpoint_every=1,
                     **a["run"])
"""


def _setup(seed):
    return tm.model("gpt2", d=32, layers=2, seed=seed, scale=3.0), random_sae(32, 64, "topk", k=4, seed=seed + 1)


def test_sigkill_then_resume_is_identical(tmp_path):
    seed = int(torch.randint(0, 2**30, ()).item())
    rng = random.Random(seed)
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(" ".join(rng.choice(tm.WORDS) for _ in range(rng.randint(0, 30)))
                              for _ in range(40)) + "\n")
    model, sae = _setup(seed)
    tok = tm.tokenizer()
    # bitwise equality needs the same BLAS thread count everywhere: one thread in this process
    # and in the killed one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _kill_and_resume(tmp_path, seed, data, model, sae, tok)
    finally:
        torch.set_num_threads(threads)


def _kill_and_resume(tmp_path, seed, data, model, sae, tok):
    ref = gradsae.score_corpus(model, sae, data, tokenizer=tok, out=tmp_path / "ref", **RUN)
    assert ref.meta["batches"] >= 10

    out = tmp_path / "killed"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS)))
    arg = json.dumps({"seed": seed, "data": str(data), "out": str(out), "run": RUN})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), arg], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env)
    ck = checkpoint_path(out, 0, 1)
    killed_at = None
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ck.is_file():
                state = load_checkpoint(ck)[2]
                if state.next_batch >= 3:
                    time.sleep(random.Random(seed).uniform(0, 0.2))  # anywhere inside a batch
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = state.next_batch
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None, proc.stdout.read().decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "meta.json").exists() and ck.is_file()  # really interrupted
    assert load_checkpoint(ck)[2].next_batch < ref.meta["batches"]

    with pytest.raises(InputError, match="unfinished run.*resume"):
        gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, **RUN)
    with pytest.raises(InputError, match="different settings.*batch_tokens"):
        gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, resume=True, **{**RUN, "batch_tokens": 48})

    # what a kill in the middle of an atomic write leaves (the kill above may or may not have)
    (ck.parent / f".{ck.name}.zz.tmp").write_bytes(b"partial")
    (out / ".latents.parquet.zz.tmp").write_bytes(b"partial")
    res = gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, resume=True, checkpoint_every=1, **RUN)
    assert res.stats == ref.stats  # exact: counts, float64 sums, maxima, tokens
    assert res.examples == ref.examples  # both sides, with their per-token windows
    assert bool((ref.examples.bottom_doc >= 0).any()) and bool((ref.examples.ctx_score != 0).any())
    for k in ("tokens", "documents", "sequences", "batches", "records"):
        assert res.meta[k] == ref.meta[k], k
    assert gradsae.LatentStats.load(out / "stats.safetensors") == ref.stats
    assert not (out / "checkpoint").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(gradsae.corpus.report.OUTPUT_FILES)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    model, sae = _setup(7)
    docs = ["the king of the north", "a queen of the south and the river"]
    a = gradsae.score_corpus(model, sae, docs, tokenizer=tm.tokenizer(), out=tmp_path / "r", resume=True, **RUN)
    b = gradsae.score_corpus(model, sae, docs, tokenizer=tm.tokenizer(), **RUN)
    assert a.stats == b.stats and (tmp_path / "r" / "meta.json").is_file()


# ---------------------------------------------------------------------------- Ctrl-C, I/O errors, changed corpus
def _docs(seed, n=30):
    rng = random.Random(seed)
    return [" ".join(rng.choice(tm.WORDS) for _ in range(rng.randint(2, 30))) for _ in range(n)]


def _reference(model, sae, data, tok):
    return gradsae.score_corpus(model, sae, data, tokenizer=tok, **RUN)


class _StopAt:
    """A forward pre-hook raising ``exc`` when the model runs its ``n``-th forward (0-based),
    or calling ``fn``."""

    def __init__(self, model, n, exc=KeyboardInterrupt):
        self.n, self.calls, self.exc = n, 0, exc
        self.h = model.transformer.h[0].register_forward_pre_hook(self)

    def __call__(self, *args):
        self.calls += 1
        if self.calls - 1 == self.n:
            raise self.exc()

    def remove(self):
        self.h.remove()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ctrl_c_writes_a_checkpoint_of_the_batches_done_and_resume_finishes(tmp_path, one_thread):
    seed = int(torch.randint(0, 2**30, ()).item())
    model, sae = _setup(seed)
    tok = tm.tokenizer()
    data = tmp_path / "c.txt"
    data.write_text("\n".join(_docs(seed)) + "\n")
    ref = _reference(model, sae, data, tok)
    assert ref.meta["batches"] >= 6
    out = tmp_path / "run"
    stop = _StopAt(model, 4)  # Ctrl-C in the middle of batch 4 (no periodic checkpoint before)
    try:
        with pytest.raises(RunInterrupted, match=r"4 batches done.*resume=True") as ei:
            gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, checkpoint_interval=None, **RUN)
    finally:
        stop.remove()
    assert isinstance(ei.value, KeyboardInterrupt)
    ck = checkpoint_path(out, 0, 1)
    assert ei.value.checkpoint == ck and ck.is_file() and not (out / "meta.json").exists()
    stats, _, state = load_checkpoint(ck)
    assert state.next_batch == 4 and state.counts["batches"] == 4  # batch 4 was not half-counted
    res = gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, resume=True, **RUN)
    assert res.stats == ref.stats and res.examples == ref.examples
    for k in ("tokens", "documents", "sequences", "batches"):
        assert res.meta[k] == ref.meta[k], k
    assert not (out / "checkpoint").exists()


def test_resume_refuses_a_corpus_that_changed(tmp_path):
    seed = int(torch.randint(0, 2**30, ()).item())
    model, sae = _setup(seed)
    tok = tm.tokenizer()
    docs = _docs(seed)
    data = tmp_path / "c.txt"
    data.write_text("\n".join(docs) + "\n")
    out = tmp_path / "run"
    stop = _StopAt(model, 5)
    try:
        with pytest.raises(RunInterrupted):
            gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, **RUN)
    finally:
        stop.remove()
    cursor = load_checkpoint(checkpoint_path(out, 0, 1))[2].cursor.doc
    assert 1 < cursor < len(docs)
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    # the same number of lines, shuffled among those already read
    shuffled = docs[:cursor][::-1] + docs[cursor:]
    assert shuffled != docs
    data.write_text("\n".join(shuffled) + "\n")
    with pytest.raises(InputError, match=r"corpus changed since the checkpoint.*first \d+ documents"):
        gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, resume=True, **RUN)
    # one document read before the cursor edited in place
    edited = list(docs)
    edited[0] = edited[0] + " the"
    data.write_text("\n".join(edited) + "\n")
    with pytest.raises(InputError, match="corpus changed"):
        gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, resume=True, **RUN)
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == before  # untouched
    # the original corpus resumes
    data.write_text("\n".join(docs) + "\n")
    res = gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, resume=True, **RUN)
    assert res.meta["documents"] == _reference(model, sae, data, tok).meta["documents"]


def _fail_from(n, err=errno.ENOSPC):
    """A function raising OSError(err) from its n-th call on (1-based: the disk stays full)
    and calling through before."""
    calls = {"n": 0}

    def wrap(real):
        def f(*a, **k):
            calls["n"] += 1
            if calls["n"] >= n:
                raise OSError(err, os.strerror(err))
            return real(*a, **k)
        return f

    return wrap


def test_disk_full_mid_run_keeps_the_last_checkpoint_and_resume_finishes(tmp_path, monkeypatch, one_thread):
    import gradsae.corpus.resume as R

    seed = int(torch.randint(0, 2**30, ()).item())
    model, sae = _setup(seed)
    tok = tm.tokenizer()
    data = tmp_path / "c.txt"
    data.write_text("\n".join(_docs(seed)) + "\n")
    ref = _reference(model, sae, data, tok)
    out = tmp_path / "run"
    real = R.save_safetensors
    monkeypatch.setattr(R, "save_safetensors", _fail_from(3)(real))  # the disk is full from the third write on
    with pytest.raises(RunIOError, match=r"No space left on device.*last checkpoint \(2 batches.*resume=True"):
        gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, checkpoint_every=1, **RUN)
    monkeypatch.setattr(R, "save_safetensors", real)
    ck = checkpoint_path(out, 0, 1)
    assert load_checkpoint(ck)[2].next_batch == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]  # no outputs, no temporary files
    assert [p.name for p in ck.parent.iterdir()] == [ck.name]
    res = gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, resume=True, **RUN)
    assert res.stats == ref.stats and res.examples == ref.examples and res.meta["batches"] == ref.meta["batches"]


def test_disk_full_writing_the_outputs_keeps_the_work(tmp_path, monkeypatch, one_thread):
    import gradsae.corpus.report as rep

    seed = int(torch.randint(0, 2**30, ()).item())
    model, sae = _setup(seed)
    tok = tm.tokenizer()
    data = tmp_path / "c.txt"
    data.write_text("\n".join(_docs(seed)) + "\n")
    ref = _reference(model, sae, data, tok)
    out = tmp_path / "run"
    real = rep.write_parquet
    monkeypatch.setattr(rep, "write_parquet", _fail_from(1)(real))
    with pytest.raises(RunIOError, match=r"writing the outputs \(No space left on device\).*resume=True"):
        gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, checkpoint_interval=None, **RUN)
    monkeypatch.setattr(rep, "write_parquet", real)
    # no part of the output set is left; a checkpoint of the whole corpus is
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]
    state = load_checkpoint(checkpoint_path(out, 0, 1))[2]
    assert state.next_batch == ref.meta["batches"]

    def no_forward(*a):
        raise AssertionError("the resumed run scored a batch again")

    h = model.transformer.h[0].register_forward_pre_hook(no_forward)
    try:
        res = gradsae.score_corpus(model, sae, data, tokenizer=tok, out=out, resume=True, **RUN)
    finally:
        h.remove()
    assert res.stats == ref.stats and res.examples == ref.examples
    for k in ("tokens", "documents", "sequences", "batches"):
        assert res.meta[k] == ref.meta[k], k
    assert sorted(p.name for p in out.iterdir()) == sorted(gradsae.corpus.report.OUTPUT_FILES)


def test_disk_full_through_the_cli_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import gradsae.corpus.resume as R
    from gradsae.cli import main

    seed = int(torch.randint(0, 2**30, ()).item())
    model, sae = _setup(seed)
    model.save_pretrained(tmp_path / "model")
    tm.tokenizer().save_pretrained(tmp_path / "model")
    sae.save(tmp_path / "sae")
    data = tmp_path / "c.txt"
    data.write_text("\n".join(_docs(seed)) + "\n")
    monkeypatch.setattr(R, "save_safetensors", _fail_from(2)(R.save_safetensors))
    argv = ["score", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"), "--hook", HOOK,
            "--data", str(data), "--out", str(tmp_path / "run"), "--max-length", "12", "--batch-tokens", "24",
            "--checkpoint-every", "1", "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and "continue with --resume" in err and "resume=True" not in err
    assert checkpoint_path(tmp_path / "run", 0, 1).is_file()


CTRL_C_WORKER = r"""
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import gradsae.commands._model as M
from gradsae.cli import main

mode, marker = sys.argv[1], sys.argv[2]
real = M.load_model


def load_model(*a, **k):
    if mode == "startup":  # Ctrl-C while the model loads
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    m = real(*a, **k)

    def slow(*args):  # one forward per batch: tell the parent, and give it time to press Ctrl-C
        with open(marker, "a") as f:
            f.write("x")
        time.sleep(0.15)

    m.transformer.h[0].register_forward_pre_hook(slow)
    return m


M.load_model = load_model
sys.exit(main(sys.argv[3:]))
"""


def _cli_assets(tmp_path, seed):
    model, sae = _setup(seed)
    model.save_pretrained(tmp_path / "model")
    tm.tokenizer().save_pretrained(tmp_path / "model")
    sae.save(tmp_path / "sae")
    data = tmp_path / "c.txt"
    data.write_text("\n".join(_docs(seed, 40)) + "\n")
    return ["score", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"), "--hook", HOOK, "--data",
            str(data), "--max-length", "12", "--batch-tokens", "24", "--top-n", "3", "--context", "2",
            "--no-progress"]


def _worker(tmp_path, mode, argv):
    script = tmp_path / "worker.py"
    script.write_text(CTRL_C_WORKER.format(tests=str(TESTS)))
    marker = tmp_path / "forwards"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), mode, str(marker), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    return proc, marker


def test_ctrl_c_in_a_real_process_checkpoints_exits_130_and_resumes(tmp_path):
    seed = int(torch.randint(0, 2**30, ()).item())
    argv = _cli_assets(tmp_path, seed)
    out = tmp_path / "run"
    proc, marker = _worker(tmp_path, "run", [*argv, "--out", str(out), "--checkpoint-interval", "100000"])
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if marker.is_file() and len(marker.read_text()) >= 4:  # 3 batches done, the 4th running
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.01)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("gradsae score: interrupted") and "continue with --resume" in lines[0], err
    state = load_checkpoint(checkpoint_path(out, 0, 1))[2]
    assert state.counts["batches"] >= 3 and not (out / "meta.json").exists()

    from gradsae.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise equality needs the worker's thread count
    try:
        assert main([*argv, "--out", str(out), "--resume"]) == 0
        assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert gradsae.LatentStats.load(out / "stats.safetensors") == gradsae.LatentStats.load(
        tmp_path / "ref" / "stats.safetensors")
    assert (out / "examples.safetensors").read_bytes() == (tmp_path / "ref" / "examples.safetensors").read_bytes()


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    argv = _cli_assets(tmp_path, 3)
    out = tmp_path / "run"
    proc, _ = _worker(tmp_path, "startup", [*argv, "--out", str(out)])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.strip() == "gradsae score: interrupted", err
    assert not out.exists()
