"""Crash-safe resume: SIGKILL a real scoring process mid-run, resume it, and get exactly the
results of an uninterrupted run."""

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
from gradsae.corpus.resume import checkpoint_path, load_checkpoint
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
    assert res.examples == ref.examples
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
