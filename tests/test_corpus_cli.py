"""`gradsae score` on the command line: a run, the finished-run rule, and one-line errors."""

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
