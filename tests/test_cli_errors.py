"""Every CLI command over a table of bad inputs: exit code 2, exactly one line on stderr in the
command's own words (no traceback, no Python-API spelling such as ``overwrite=True``), and
nothing left on disk. Most rows run ``gradsae.cli.main`` in this process; a few run the real
``python -m gradsae`` to check the exit code and stderr of the process itself."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

from gradsae.cli import _commands, build_parser, cli_words, main

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_errors")
    m = tm.model("gpt2", d=32, layers=2, seed=1, scale=3.0)
    m.save_pretrained(d / "model")
    tm.tokenizer().save_pretrained(d / "model")
    sae = random_sae(32, 64, "topk", k=4, seed=2)
    sae.meta.hook_name = HOOK
    sae.save(d / "sae")
    random_sae(40, 64, "topk", k=4, seed=3).save(d / "sae40")
    random_sae(32, 64, "topk", k=4, seed=4).save(d / "sae_nohook")
    (d / "c.jsonl").write_text("\n".join(json.dumps({"text": "the king of the north and the queen " * (i % 3 + 1)})
                                         for i in range(6)) + "\n")
    (d / "nofield.jsonl").write_text('{"text": "the king"}\n{"title": "the queen"}\n')
    (d / "latin1.txt").write_bytes(b"the king\nthe caf\xe9 queen\n")
    (d / "notamodel").mkdir()
    (d / "notamodel" / "weights.bin").write_bytes(b"x")
    (d / "a_file").write_text("x")
    tm.squad_json(d / "squad.json", tm.QA[:2])
    (d / "template.txt").write_text("no placeholders here")
    # a finished run to collide with
    assert main(["score", "--model", str(d / "model"), "--sae", str(d / "sae"), "--data", str(d / "c.jsonl"),
                 "--out", str(d / "finished"), "--max-length", "8", "--no-progress"]) == 0
    return d


@pytest.fixture(autouse=True)
def _no_loading_bars():
    # transformers' weight-loading bar is its output, not an error line: off for these rows
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()


def _unfinished(out: Path) -> None:
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "rank0-of1.safetensors").write_bytes(b"not really")


def _foreign(out: Path) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("mine")


def _readonly(monkeypatch):
    import gradsae.corpus.resume as R

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(R.tempfile, "mkstemp", refuse)


NO_CUDA = not torch.cuda.is_available()

# (command, arguments (A: assets, O: the row's output path), words the message must contain,
#  optional setup(out) before the row, optional patch(monkeypatch))
SCORE = ["--model", "{A}/model", "--sae", "{A}/sae", "--data", "{A}/c.jsonl", "--max-length", "8", "--no-progress"]
PROMPT = ["--model", "{A}/model", "--sae", "{A}/sae", "--prompt", "the king of the north"]
ROWS = [
    ("score", [*SCORE, "--out", "{O}", "--device", "cuda:99"], ["cuda:99"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--device", "tpu"], ["unknown device 'tpu'"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--method", "exact"], ["--method", "invalid choice"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--method", "ig", "--steps", "0"], ["steps must be"], None, None),
    *([("score", [*SCORE, "--out", "{O}", "--device", "cuda"], ["not available", "--device cpu"], None, None)]
      if NO_CUDA else []),
    ("score", [*SCORE[2:], "--model", "{A}/nowhere/model", "--out", "{O}"], ["--model", "no such directory"],
     None, None),
    ("score", [*SCORE[2:], "--model", "{A}/notamodel", "--out", "{O}"], ["not a transformers model directory"],
     None, None),
    ("score", [*SCORE[2:], "--model", "not a hub id!", "--out", "{O}"], ["not a hub id"], None, None),
    ("score", [*SCORE[2:], "--model", "{A}/a_file", "--out", "{O}"], ["--model", "not a directory"], None, None),
    ("score", [*SCORE, "--tokenizer", "{A}/nowhere", "--out", "{O}"], ["--tokenizer", "no such directory"],
     None, None),
    ("score", [*SCORE, "--out", "/proc/gradsae-test/run"], ["cannot create the output directory"], None, None),
    ("score", [*SCORE, "--out", "{A}/a_file/run"], ["is not a directory"], None, None),
    ("score", [*SCORE, "--out", "{A}/a_file"], ["exists and is not a directory"], None, None),
    ("score", [*SCORE, "--out", "{O}"], ["cannot write in the output directory", "Read-only"], None, _readonly),
    ("score", [*SCORE, "--out", "{A}/finished"], ["holds a finished run", "--overwrite"], None, None),
    ("score", [*SCORE, "--out", "{O}"], ["unfinished run", "--resume", "--overwrite"], _unfinished, None),
    ("score", [*SCORE, "--out", "{O}"], ["not from a gradsae run", "notes.txt"], _foreign, None),
    ("score", [*SCORE, "--out", "{O}", "--resume", "--overwrite"], ["--resume and --overwrite contradict"],
     None, None),
    ("score", [*SCORE, "--out", "{O}", "--max-length", "1000"],
     ["--max-length 1000 does not fit", "128 positions", "--max-length 128"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--max-length", "1"], ["--max-length must be an int >= 2"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--max-length", "abc"], ["--max-length", "invalid int"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--batch-tokens", "0"], ["--batch-tokens must be"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--top-n", "0"], ["--top-n must be"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--context", "-1"], ["--context must be"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--checkpoint-interval", "0"], ["--checkpoint-interval"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--checkpoint-every", "0"], ["--checkpoint-every"], None, None),
    ("score", [*SCORE[:4], "--data", "{A}/missing.jsonl", "--out", "{O}"], ["no such file"], None, None),
    ("score", [*SCORE[:4], "--data", "{A}/nofield.jsonl", "--out", "{O}", "--no-progress"], ["nofield.jsonl:2: no field 'text'",
                                                                             "--field"], None, None),
    ("score", [*SCORE[:4], "--data", "{A}/latin1.txt", "--out", "{O}", "--no-progress"], ["latin1.txt:2", "not valid UTF-8",
                                                                          "--encoding-errors"], None, None),
    ("score", [*SCORE[:4], "--data", "{A}/c.jsonl", "--format", "datasets", "--out", "{O}"], ["datasets"],
     None, None),
    ("score", [*SCORE, "--out", "{O}", "--objective", "logprob"], ["--objective logprob needs --target"],
     None, None),
    ("score", [*SCORE, "--out", "{O}", "--objective", "logit_diff", "--target", "the"], ["--target-b"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--objective", "loss", "--target", "the"], ["--target", "logprob"],
     None, None),
    ("score", [*SCORE, "--out", "{O}", "--objective", "logprob", "--target", "the king"], ["--target", "2 tokens"],
     None, None),
    ("score", [*SCORE, "--out", "{O}", "--objective", "logprob", "--target", "99999"], ["--target 99999",
                                                                                        "not a token id"],
     None, None),
    ("score", [*SCORE, "--out", "{O}", "--objective", "bogus"], ["--objective", "invalid choice"], None, None),
    ("score", [*SCORE, "--out", "{O}", "--position", "2"], ["--position is for"], None, None),
    ("score", [*SCORE[:2], "--sae", "{A}/sae40", *SCORE[4:], "--hook", HOOK, "--out", "{O}"],
     ["d_in=40 does not match"],
     None, None),
    ("score", [*SCORE[:2], "--sae", "{A}/nosae", *SCORE[4:], "--out", "{O}"], ["nosae"], None, None),
    ("score", [*SCORE[:2], "--sae", "{A}/sae_nohook", *SCORE[4:], "--out", "{O}"], ["names no hook", "--hook"],
     None, None),
    ("score", [*SCORE, "--out", "{O}", "--hook", "blocks.9.hook_resid_post"], ["unknown hook"], None, None),
    ("score", [*SCORE[2:], "--out", "{O}"], ["--model", "required"], None, None),
    ("select", [*PROMPT, "--k", "abc"], ["K must be"], None, None),
    ("select", [*PROMPT, "--k", "200%"], ["fractional K"], None, None),
    ("select", [*PROMPT[:4], "--prompt-file", "{A}/missing.txt"], ["--prompt-file", "No such file"], None, None),
    ("select", PROMPT[:4], ["--prompt", "required"], None, None),
    ("select", [*PROMPT, "--device", "tpu"], ["unknown device"], None, None),
    ("select", [*PROMPT, "--method", "ig", "--steps", "0"], ["--steps must be >= 1"], None, None),
    ("select", [*PROMPT, "--method", "exact", "--trigger", "["], ["--method exact", "--trigger"], None, None),
    ("select", [*PROMPT, "--method", "shap"], ["--method", "invalid choice"], None, None),
    ("select", [*PROMPT[2:], "--model", "{A}/nowhere"], ["no such directory"], None, None),
    ("select", [*PROMPT, "--trigger", "[", "--objective", "loss"], ["--trigger scores predicted_prob"], None, None),
    ("select", [*PROMPT, "--hook", "blocks.9.hook_resid_post"], ["unknown hook"], None, None),
    ("select", [*PROMPT[:2], "--sae", "{A}/sae_nohook", *PROMPT[4:]], ["names no hook", "--hook"], None, None),
    ("ablate", [*PROMPT, "--latents", "a,b"], ["comma-separated integers"], None, None),
    ("ablate", [*PROMPT, "--latents", "3,99999"], ["--latents", "[0, 64)", "99999"], None, None),
    ("ablate", [*PROMPT, "--top", "abc"], ["K must be"], None, None),
    ("ablate", PROMPT, ["one of the arguments", "required"], None, None),
    ("steer", PROMPT, ["nothing to do"], None, None),
    ("steer", [*PROMPT, "--set", "3"], ["--set takes LATENT=VALUE"], None, None),
    ("steer", [*PROMPT, "--add", "500=1.0"], ["--add", "[0, 64)"], None, None),
    ("steer", [*PROMPT, "--donor", "the queen", "--k", "x"], ["K must be"], None, None),
    ("steer", [*PROMPT, "--zero", "1", "--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"], None, None),
    ("experiment", [*PROMPT[:4], "--data", "{A}/missing.json"], ["missing.json"], None, None),
    ("experiment", [*PROMPT[:4], "--data", "{A}/squad.json", "--ks", "1,abc"], ["bad K"], None, None),
    ("experiment", [*PROMPT[:4], "--data", "{A}/squad.json", "--methods", "magic"], ["--methods", "magic"],
     None, None),
    ("experiment", [*PROMPT[:4], "--data", "{A}/squad.json", "--template-file", "{A}/template.txt"],
     ["{context} and {question}"], None, None),
    ("experiment", [*PROMPT[:4], "--data", "{A}/squad.json", "--out", "/proc/gradsae-test/r.json"],
     ["--out", "does not exist"], None, None),
    ("experiment", [*PROMPT[:4], "--data", "{A}/squad.json", "--limit", "0"], ["--limit must be >= 1"], None, None),
    ("demo", ["--quick", "--data", "{A}/nowhere", "--out", "{O}.png"], ["demo model is incomplete"], None, None),
    ("demo", ["--quick", "--prompts", "0", "--out", "{O}.png"], ["--prompts must be >= 1"], None, None),
    ("demo", ["--quick", "--out", "/proc/gradsae-test/p.png"], ["--out", "does not exist"], None, None),
    ("demo", ["--sae", "bogus"], ["--sae", "invalid choice"], None, None),
    ("validate", [], ["give --demo, or --model, --sae and --prompts-file"], None, None),
    ("validate", ["--demo", "--k", "0"], ["--k must be >= 1"], None, None),
    ("validate", ["--demo", "--steps", "0"], ["--steps must be >= 1"], None, None),
    ("validate", ["--demo", "--budget", "0"], ["--budget must be >= 1"], None, None),
    ("validate", ["--demo", "--model", "{A}/model"], ["--demo brings its own model"], None, None),
    ("validate", ["--demo", "--objective", "logprob"], ["--objective logprob needs --target"], None, None),
    ("validate", ["--demo", "--out", "/proc/gradsae-test/v"], ["--out", "does not exist"], None, None),
    ("validate", ["--demo", "--out", "{A}/a_file"], ["--out", "exists and is not a directory"], None, None),
    ("validate", [*PROMPT[:4], "--prompts-file", "{A}/missing.txt", "--out", "{O}"],
     ["--prompts-file", "No such file"], None, None),
    ("validate", [*PROMPT[:4], "--prompts-file", "{A}/template.txt", "--out", "{O}", "--k", "x"],
     ["--k", "invalid int"], None, None),
    ("bench", ["--T", "0"], ["--T must be >= 1"], None, None),
    ("bench", ["--k", "100", "--d-sae", "10"], ["--k 100 is larger than --d-sae 10"], None, None),
    ("bench", ["--device", "tpu"], ["unknown device"], None, None),
    ("bench", ["--backend", "nope"], ["unknown --backend 'nope'"], None, None),
    ("bench", ["--out", "/proc/gradsae-test/b.json"], ["--out", "does not exist"], None, None),
    ("export", ["{A}/nowhere", "--format", "html"], ["no such run directory"], None, None),
    ("export", ["{A}/a_file", "--format", "html"], ["is not a directory"], None, None),
    ("export", ["{A}/notamodel", "--format", "neuronpedia"], ["no finished run", "meta.json"], None, None),
    ("export", ["{A}/finished"], ["--format", "required"], None, None),
    ("export", ["{A}/finished", "--format", "pdf"], ["--format", "invalid choice"], None, None),
    ("export", ["{A}/finished", "--format", "html", "--by", "bogus"], ["--by must be one of"], None, None),
    ("export", ["{A}/finished", "--format", "html", "--top", "-1"], ["--top must be >= 0"], None, None),
    ("export", ["{A}/finished", "--format", "html", "--out", "{A}/a_file"], ["exists", "--overwrite"], None, None),
    ("export", ["{A}/finished", "--format", "html", "--out", "{A}/notamodel", "--overwrite"], ["is a directory"],
     None, None),
    ("export", ["{A}/finished", "--format", "neuronpedia", "--out", "{A}/a_file", "--overwrite"],
     ["exists and is not a directory"], None, None),
    ("export", ["{A}/finished", "--format", "html", "--out", "/proc/gradsae-test/p.html"], ["does not exist"],
     None, None),
    ("info", ["--bogus"], ["unrecognized arguments: --bogus"], None, None),
    (None, ["bogus"], ["invalid choice: 'bogus'"], None, None),
]


def _fill(args, assets, out):
    return [a.replace("{A}", str(assets)).replace("{O}", str(out)) for a in args]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def _api_spellings(cmd: str | None) -> re.Pattern:
    """Python-API spellings of the command's options (``max_length=``, ``overwrite=True``)."""
    parser = build_parser()
    dests = {"hook", "overwrite", "resume"}
    if cmd is not None:
        sub = next(a for a in parser._actions if a.dest == "command").choices[cmd]
        dests |= {a.dest for a in sub._actions if a.option_strings}
    return re.compile(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, dests))) + r")=|\(CLI:")


def test_every_command_has_rows():
    assert {r[0] for r in ROWS if r[0]} == set(_commands())


@pytest.mark.parametrize("row", ROWS, ids=[f"{i}-{r[0]}-{'_'.join(r[1][-2:])}"[:60] for i, r in enumerate(ROWS)])
def test_bad_input_is_one_line_exit_2(row, assets, tmp_path, capsys, monkeypatch):
    cmd, args, words, setup, patch = row
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    if setup is not None:
        setup(out)
    if patch is not None:
        patch(monkeypatch)
    monkeypatch.chdir(work)
    before, finished = _tree(work), _tree(assets / "finished")
    argv = ([cmd] if cmd else []) + _fill(args, assets, out)
    rc = main(argv)
    cap = capsys.readouterr()
    lines = cap.err.strip("\n").split("\n")
    assert rc == 2, (argv, cap.err, cap.out)
    assert len(lines) == 1 and lines[0], cap.err
    assert lines[0].startswith(f"gradsae {cmd}: error: " if cmd else "gradsae: error: "), lines[0]
    assert "Traceback" not in cap.err
    assert not _api_spellings(cmd).search(lines[0]), lines[0]
    for w in words:
        assert w.replace("{A}", str(assets)) in lines[0], (w, lines[0])
    assert _tree(work) == before, "files were left behind"
    assert _tree(assets / "finished") == finished
    assert not Path("/proc/gradsae-test").exists()


SUBPROCESS_ROWS = [
    ("score", [*SCORE, "--out", "{O}", "--device", "cuda:99"], "cuda:99"),
    ("score", [*SCORE, "--out", "/proc/gradsae-test/run"], "cannot create the output directory"),
    ("score", [*SCORE, "--out", "{O}", "--max-length", "1000"], "does not fit"),
    (None, ["bogus"], "invalid choice"),
]


@pytest.mark.parametrize("row", SUBPROCESS_ROWS, ids=[f"{r[0]}-{r[1][-1]}" for r in SUBPROCESS_ROWS])
def test_bad_input_in_a_real_process(row, assets, tmp_path):
    cmd, args, word = row
    out = tmp_path / "out"
    argv = ([cmd] if cmd else []) + _fill(args, assets, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "gradsae", *argv], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    lines = res.stderr.strip("\n").split("\n")
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_words_translates_api_spellings():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["score"]
    assert cli_words("pass overwrite=True (CLI: --overwrite) to replace it", sub) == "pass --overwrite to replace it"
    assert cli_words("the SAE names no hook; pass hook=...", sub) == "the SAE names no hook; pass --hook ..."
    assert cli_words("use max_length=96 or less", sub) == "use --max-length 96 or less"
    assert cli_words("top_n must be an int", sub) == "--top-n must be an int"
    assert cli_words("use device='cpu'", sub) == "use --device cpu"
    # other words and paths are left alone, and messages become one line
    assert cli_words("/data/max_length/x.txt: d_in=40\n  details", sub) == "/data/max_length/x.txt: d_in=40 details"


def test_rows_leave_assets_clean(assets):
    # the table must not have written into the shared assets (outputs go to each row's tmp dir)
    names = {p.name for p in assets.iterdir()}
    assert names == {"model", "sae", "sae40", "sae_nohook", "c.jsonl", "nofield.jsonl", "latin1.txt", "notamodel",
                     "a_file", "squad.json", "template.txt", "finished"}
