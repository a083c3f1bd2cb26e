"""Corpus runs with several SAEs in one forward and backward per batch: each hook's
statistics and examples equal a single-SAE run (error mode), a run resumed after Ctrl-C equals
an uninterrupted one, and `torchrun -m gradsae score --sae A --sae B --hook .. --hook ..`
equals the same run in one process."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import tiny_models as tm
import torch
from oracle import random_sae
from safetensors.torch import load_file

import gradsae
from gradsae.corpus.examples import TopExamples
from gradsae.corpus.resume import RunInterrupted, checkpoint_path, load_checkpoint
from gradsae.errors import InputError

A, B = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
RUN = dict(max_length=12, batch_tokens=24, top_n=3, context=2, progress=False)


def _setup(seed):
    model = tm.model("gpt2", d=32, layers=2, seed=seed, scale=3.0)
    return model, {A: random_sae(32, 64, "topk", k=4, seed=seed + 1), B: random_sae(32, 48, "topk", k=3, seed=seed + 2)}


def _docs(seed, n=16):
    rng = random.Random(seed)
    return [" ".join(rng.choice(tm.WORDS) for _ in range(rng.randint(2, 30))) for _ in range(n)]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hook_files(out, hook):
    d = out / "hooks" / hook
    stats = gradsae.LatentStats.load(d / "stats.safetensors")
    return stats, TopExamples.from_dict(load_file(d / "examples.safetensors")), d


def test_two_sae_run_equals_two_single_runs(tmp_path, one_thread):
    seed = int(torch.randint(0, 2**30, ()).item())
    model, saes = _setup(seed)
    tok = tm.tokenizer()
    data = _docs(seed)
    out = tmp_path / "multi"
    res = gradsae.score_corpus(model, saes, data, mode="error", tokenizer=tok, out=out, **RUN)
    assert list(res.hooks) == [A, B]
    assert res.stats is res.hooks[A].stats
    meta = json.loads((out / "meta.json").read_text())
    assert meta["hook"] == [A, B] and meta["config"]["hook"] == [A, B]
    for h, sae in saes.items():
        one = gradsae.score_corpus(model, sae, data, hook=h, mode="error", tokenizer=tok, **RUN)
        assert res.hooks[h].stats == one.stats, h
        assert res.hooks[h].examples == one.examples, h
        stats, ex, d = _hook_files(out, h)
        assert stats == one.stats and ex == one.examples
        assert (d / "latents.parquet").is_file() and not (d / "meta.json").exists()
        assert meta["hooks"][h]["active_latents"] == int((one.stats.count > 0).sum())
        assert one.stats.tokens == meta["tokens"]
        for k in ("documents", "sequences", "batches"):
            assert one.meta[k] == meta[k], k
    assert int(res.hooks[A].stats.count.sum()) > 0 and int(res.hooks[B].stats.count.sum()) > 0
    assert sorted(p.name for p in out.iterdir()) == ["hooks", "meta.json"]
    for f in meta["files"]:
        assert (out / f).is_file(), f
    # a finished multi-SAE run is replaced only with overwrite, as a single one
    with pytest.raises(InputError, match="finished run"):
        gradsae.score_corpus(model, saes, data, mode="error", tokenizer=tok, out=out, **RUN)
    gradsae.score_corpus(model, saes, data[:3], mode="error", tokenizer=tok, out=out, overwrite=True, **RUN)
    assert json.loads((out / "meta.json").read_text())["documents"] == 3


class _StopAt:
    """Ctrl-C (KeyboardInterrupt) at the model's ``n``-th forward (0-based)."""

    def __init__(self, model, n):
        self.n, self.calls = n, 0
        self.h = model.transformer.h[0].register_forward_pre_hook(self)

    def __call__(self, *args):
        self.calls += 1
        if self.calls - 1 == self.n:
            raise KeyboardInterrupt

    def remove(self):
        self.h.remove()


def test_resume_after_ctrl_c_equals_uninterrupted(tmp_path, one_thread):
    seed = int(torch.randint(0, 2**30, ()).item())
    model, saes = _setup(seed)
    tok = tm.tokenizer()
    data = tmp_path / "c.txt"
    data.write_text("\n".join(_docs(seed)) + "\n")
    lst, hooks = list(saes.values()), list(saes)
    ref = gradsae.score_corpus(model, lst, data, hook=hooks, tokenizer=tok, **RUN)  # splice mode
    assert ref.meta["batches"] >= 4
    out = tmp_path / "run"
    stop = _StopAt(model, 3)
    try:
        with pytest.raises(RunInterrupted, match="3 batches done"):
            gradsae.score_corpus(model, lst, data, hook=hooks, tokenizer=tok, out=out, checkpoint_interval=None, **RUN)
    finally:
        stop.remove()
    stats, examples, state = load_checkpoint(checkpoint_path(out, 0, 1))
    assert list(stats) == hooks and list(examples) == hooks and state.counts["batches"] == 3
    # another set of SAEs/hooks cannot continue it
    with pytest.raises(InputError, match="different settings"):
        gradsae.score_corpus(model, lst[:1], data, hook=hooks[:1], tokenizer=tok, out=out, resume=True, **RUN)
    res = gradsae.score_corpus(model, lst, data, hook=hooks, tokenizer=tok, out=out, resume=True, **RUN)
    for h in hooks:
        assert res.hooks[h].stats == ref.hooks[h].stats, h
        assert res.hooks[h].examples == ref.hooks[h].examples, h
        st, ex, _ = _hook_files(out, h)
        assert st == ref.hooks[h].stats and ex == ref.hooks[h].examples
    for k in ("tokens", "documents", "sequences", "batches"):
        assert res.meta[k] == ref.meta[k], k
    assert not (out / "checkpoint").exists()


def test_bad_multi_settings(tmp_path):
    model, saes = _setup(0)
    lst = list(saes.values())
    with pytest.raises(InputError, match="one hook each"):
        gradsae.score_corpus(model, lst, ["a b c"], hook=[A], tokenizer=tm.tokenizer(), **RUN)
    with pytest.raises(InputError, match="names its hooks"):
        gradsae.score_corpus(model, saes, ["a b c"], hook=A, tokenizer=tm.tokenizer(), **RUN)
    with pytest.raises(InputError, match="names no hook"):  # random SAEs carry no hook_name
        gradsae.score_corpus(model, lst, ["a b c"], tokenizer=tm.tokenizer(), **RUN)
    from argparse import Namespace

    from gradsae.commands.score import hooks_of

    with pytest.raises(InputError, match="2 --sae need one --hook each"):
        hooks_of(Namespace(sae=["x", "y"], hook=[A]))
    assert hooks_of(Namespace(sae=["x", "y"], hook=[A, B])) == [A, B]
    assert hooks_of(Namespace(sae=["x", "y"], hook=None)) is None
    assert hooks_of(Namespace(sae=["x"], hook=[A])) == A


def _torchrun():
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def test_cli_two_saes_under_torchrun_equal_one_process(tmp_path):
    seed = int(torch.randint(0, 2**30, ()).item())
    model, saes = _setup(seed)
    tok = tm.tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    for i, sae in enumerate(saes.values()):
        sae.save(tmp_path / f"sae{i}")
    data = tmp_path / "c.txt"
    data.write_text("\n".join(_docs(seed)) + "\n")
    out = tmp_path / "dist"
    port = 29500 + seed % 2000
    cmd = _torchrun() + ["--nproc-per-node", "2", "--master-port", str(port), "-m", "gradsae", "score",
                         "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae0"), "--hook", A,
                         "--sae", str(tmp_path / "sae1"), "--hook", B, "--data", str(data), "--max-length", "12",
                         "--batch-tokens", "24", "--top-n", "3", "--context", "2", "--out", str(out),
                         "--device", "cpu", "--mode", "error"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    from gradsae.commands._model import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = gradsae.score_corpus(load_model(str(tmp_path / "model")), list(saes.values()), data, hook=[A, B],
                                   mode="error", tokenizer=tok, **RUN)
    finally:
        torch.set_num_threads(threads)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["hook"] == [A, B]
    for h in (A, B):
        got, ex, _ = _hook_files(out, h)
        want = ref.hooks[h]
        assert got.tokens == want.stats.tokens
        assert torch.equal(got.count, want.stats.count) and torch.equal(got.score_max, want.stats.score_max)
        for f in ("act_sum", "score_sum", "relu_sum", "abs_sum"):
            torch.testing.assert_close(getattr(got, f), getattr(want.stats, f), rtol=1e-12, atol=1e-12)
        assert ex == want.examples
    assert not (out / "checkpoint").exists()


def test_export_one_hook_of_a_multi_sae_run(tmp_path, one_thread, capsys):
    """`gradsae export RUN --hook H` exports that hook's latents and examples (the same page as
    a single-SAE run of that hook gives); without --hook, or with a hook the run did not
    score, one line names the run's hooks."""
    from gradsae.cli import main
    from gradsae.corpus import export as E

    seed = int(torch.randint(0, 2**30, ()).item())
    model, saes = _setup(seed)
    tok, data = tm.tokenizer(), _docs(seed)
    gradsae.score_corpus(model, saes, data, mode="error", tokenizer=tok, out=tmp_path / "multi", **RUN)
    gradsae.score_corpus(model, saes[B], data, hook=B, mode="error", tokenizer=tok, out=tmp_path / "one", **RUN)
    with pytest.raises(InputError, match=f"2 hooks \\({A}, {B}\\).*--hook"):
        E.load_run(tmp_path / "multi")
    with pytest.raises(InputError, match="no hook 'blocks.5"):
        E.load_run(tmp_path / "multi", hook="blocks.5.hook_resid_post")
    assert main(["export", str(tmp_path / "multi"), "--hook", B, "--format", "html", "--top", "0"]) == 0
    assert (tmp_path / f"multi-{B}.html").is_file()
    got, want = E.load_run(tmp_path / "multi", hook=B), E.load_run(tmp_path / "one")
    assert got.meta["hook"] == B and got.meta["sae"] == want.meta["sae"]
    assert got.table.equals(want.table)
    page = lambda r: {k: v for k, v in E.page_data(r, top=None).items() if k != "meta"}  # noqa: E731
    assert page(got) == page(want)
    assert main(["export", str(tmp_path / "multi"), "--format", "neuronpedia"]) == 2
    assert "--hook" in capsys.readouterr().err
