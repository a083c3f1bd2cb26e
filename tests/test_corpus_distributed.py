"""`torchrun --nproc-per-node 2 -m gradsae score` on CPU (gloo) gives the single-process
results: counts, maxima, tokens and top examples exactly, float64 sums up to summation order."""

import json
import os
import random
import shutil
import subprocess
import sys

import tiny_models as tm
import torch
from oracle import random_sae

import gradsae
from gradsae.corpus.examples import TopExamples

HOOK = "blocks.1.hook_resid_post"


def _torchrun():
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _run_case(tmp_path, launch):
    """Score a small corpus with the processes ``launch(common_args, env)`` starts (a list of
    Popen), then compare with the same run in this process."""
    seed = int(torch.randint(0, 2**30, ()).item())
    rng = random.Random(seed)
    model = tm.model("gpt2", d=32, layers=2, seed=seed, scale=3.0)
    tok = tm.tokenizer()
    sae = random_sae(32, 64, "topk", k=4, seed=seed + 1)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    sae.save(tmp_path / "sae")
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps({"body": " ".join(rng.choice(tm.WORDS) for _ in range(rng.randint(0, 30)))})
                              for _ in range(30)) + "\n")
    out = tmp_path / "dist"
    args = ["-m", "gradsae", "score", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"),
            "--hook", HOOK, "--data", str(data), "--field", "body", "--max-length", "12", "--batch-tokens", "24",
            "--top-n", "3", "--context", "2", "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = launch(args, env, 29500 + seed % 2000)
    logs = []
    for p in procs:
        o, e = p.communicate(timeout=540)
        logs.append(o[-2000:] + e[-3000:])
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)
    assert any("over 2 process(es)" in x for x in logs)  # the summary line

    # the same run in this process, on the model loaded as the CLI loads it (attention
    # implementation included) and with one thread, as each torchrun worker
    from gradsae.commands._model import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = gradsae.score_corpus(load_model(str(tmp_path / "model")), sae, data, field="body", hook=HOOK, tokenizer=tok, max_length=12, batch_tokens=24,
                                   top_n=3, context=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    got = gradsae.LatentStats.load(out / "stats.safetensors")
    assert got.tokens == ref.stats.tokens
    assert torch.equal(got.count, ref.stats.count)
    assert torch.equal(got.score_max, ref.stats.score_max)
    for f in ("act_sum", "score_sum", "relu_sum", "abs_sum"):
        torch.testing.assert_close(getattr(got, f), getattr(ref.stats, f), rtol=1e-12, atol=1e-12)
    from safetensors.torch import load_file

    ex = TopExamples.from_dict(load_file(out / "examples.safetensors"))
    assert ex == ref.examples  # top and bottom, with their per-token windows
    assert bool((ex.bottom_doc >= 0).any()) and bool((ex.bottom_ctx_score != 0).any())
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["tokens"] == ref.meta["tokens"]
    for k in ("documents", "sequences", "batches"):
        assert meta[k] == ref.meta[k], k
    assert not (out / "checkpoint").exists()


def _popen(cmd, env):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_torchrun_two_processes_equal_single_process(tmp_path):
    _run_case(tmp_path, lambda args, env, port: [
        _popen(_torchrun() + ["--nproc-per-node", "2", "--master-port", str(port), *args], env)])


def test_torchrun_two_nodes_through_rendezvous_equal_single_process(tmp_path):
    """Two torchrun launchers, one process each, meeting through the c10d rendezvous as two
    nodes would (here both on localhost)."""

    def launch(args, env, port):
        rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port + 2000}", "--rdzv-id", f"gradsae-test-{port}"]
        return [_popen(_torchrun() + rdzv + args, env) for _ in range(2)]

    _run_case(tmp_path, launch)
