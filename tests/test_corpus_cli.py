"""`gradsae score` on the command line: a run, the finished-run rule, and one-line errors."""

import argparse
import json

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

import gradsae
from gradsae.cli import main

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    seed = int(torch.randint(0, 2**30, ()).item())
    tm.model("gpt2", d=32, layers=2, seed=seed, scale=3.0).save_pretrained(d / "model")
    tm.tokenizer().save_pretrained(d / "model")
    random_sae(32, 64, "topk", k=4, seed=seed).save(d / "sae")
    random_sae(40, 64, "topk", k=4, seed=seed).save(d / "sae40")
    (d / "c.jsonl").write_text("\n".join(json.dumps({"text": "the king of the north and the queen " * (i % 3 + 1)})
                                         for i in range(12)) + "\n")
    return d


def _args(a, out, *extra, sae="sae", data="c.jsonl"):
    return ["score", "--model", str(a / "model"), "--sae", str(a / sae), "--hook", HOOK, "--data", str(a / data),
            "--out", str(out), "--max-length", "8", "--batch-tokens", "32", "--no-progress", *extra]


def test_score_command_runs_and_matches_the_api(assets, tmp_path):
    out = tmp_path / "run"
    assert main(_args(assets, out)) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["hook"] == HOOK and meta["config"]["data"]["format"] == "jsonl" and meta["tokens"] > 0
    from gradsae.commands._model import load_model

    tok = tm.tokenizer()
    ref = gradsae.score_corpus(load_model(str(assets / "model")), gradsae.load_sae(assets / "sae"),
                               assets / "c.jsonl", hook=HOOK, tokenizer=tok, max_length=8, batch_tokens=32,
                               progress=False)
    assert gradsae.LatentStats.load(out / "stats.safetensors") == ref.stats


def test_score_command_errors(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(assets, out)) == 0
    capsys.readouterr()
    assert main(_args(assets, out)) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert main(_args(assets, out, "--overwrite")) == 0
    capsys.readouterr()
    assert main(_args(assets, tmp_path / "x", sae="sae40")) == 2
    assert "d_in=40 does not match" in capsys.readouterr().err
    bad = assets / "bad.jsonl"
    bad.write_text('{"text": "the king"}\n{"title": "the queen"}\n')
    assert main(_args(assets, tmp_path / "y", data="bad.jsonl")) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: no field 'text'" in err and "Traceback" not in err
    assert main(_args(assets, tmp_path / "z", data="missing.txt")) == 2
    assert "no such file" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


def test_no_progress_is_silent_model_loading_included(assets, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as a fresh process starts
    capsys.readouterr()
    assert main(_args(assets, tmp_path / "run")) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out == ""
    assert hf_logging.is_progress_bar_enabled()  # restored for whoever runs next in this process


def test_objective_options_reach_the_run(assets, tmp_path):
    """--objective logprob --target TEXT: the token id of TEXT at --position; the sign is in meta."""
    tok = tm.tokenizer()
    out = tmp_path / "run"
    assert main(_args(assets, out, "--objective", "logprob", "--target", "king", "--position", "-2")) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["objective"] == "logprob"
    assert meta["config"]["objective_kwargs"] == {"position": "-2", "target": repr(tok.convert_tokens_to_ids("king"))}
    assert "target token more likely" in meta["sign"]["positive"]
    ref = gradsae.score_corpus(gradsae.commands._model.load_model(str(assets / "model")),
                               gradsae.load_sae(assets / "sae"), assets / "c.jsonl", hook=HOOK, tokenizer=tok,
                               max_length=8, batch_tokens=32, progress=False, objective="logprob",
                               target=tok.convert_tokens_to_ids("king"), position=-2)
    assert gradsae.LatentStats.load(out / "stats.safetensors") == ref.stats


def test_default_objective_and_its_sign_in_help_and_meta(assets, tmp_path, capsys):
    from gradsae.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["score"]
    text = " ".join(sub.format_help().split())
    assert "default loglik" in text and "positive = helps the model predict the text" in text
    for opt in ("--mode", "--objective", "--target", "--target-b", "--position", "--no-progress"):
        action = next(a for a in sub._actions if opt in a.option_strings)
        assert action.help, opt
    out = tmp_path / "run"
    assert main(_args(assets, out)) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["objective"] == "loglik" and meta["config"]["objective"] == "loglik"
    assert meta["sign"]["positive"] == "the latent helps the model predict the next token"
    assert meta["files"] == ["stats.safetensors", "examples.safetensors", "latents.parquet", "report.png",
                             "meta.json"]


def test_bench_options_all_have_help():
    from gradsae.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["bench"]
    shown = [a for a in sub._actions if a.option_strings and a.help != argparse.SUPPRESS]
    assert len(shown) >= 9 and all(a.help for a in shown), [a.dest for a in shown if not a.help]


WITHOUT_MATPLOTLIB = r"""
import sys
sys.modules["matplotlib"] = None  # as if it were not installed
from gradsae.commands import _model as M
from gradsae.cli import main

real = M.load_model


def load_model(*a, **k):
    m = real(*a, **k)
    first = []

    def note(*args):
        if not first:
            first.append(1)
            print("FIRST BATCH", file=sys.stderr, flush=True)

    m.transformer.h[0].register_forward_pre_hook(note)
    return m


M.load_model = load_model
sys.exit(main(sys.argv[1:]))
"""


def test_without_matplotlib_the_run_skips_report_png_with_a_note_before_the_work(assets, tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(WITHOUT_MATPLOTLIB)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(script), *_args(assets, out)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == ["gradsae score: warning: report.png will not be written: matplotlib is not installed "
                     "(pip install 'gradsae[report]')", "FIRST BATCH"], res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["stats.safetensors", "examples.safetensors", "latents.parquet", "meta.json"])
    meta = json.loads((out / "meta.json").read_text())
    assert "matplotlib" in meta["skipped"]["report.png"] and "report.png" not in meta["files"]
