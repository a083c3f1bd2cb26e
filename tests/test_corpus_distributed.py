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


def test_torchrun_two_processes_equal_single_process(tmp_path):
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
    args = ["--model", str(tmp_path / "model"), "--sae", str(tmp_path / "sae"), "--hook", HOOK, "--data", str(data),
            "--field", "body", "--max-length", "12", "--batch-tokens", "24", "--top-n", "3", "--context", "2",
            "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = _torchrun() + ["--nproc-per-node", "2", "--master-port", str(29500 + seed % 2000), "-m", "gradsae",
                         "score", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "over 2 process(es)" in p.stderr  # the summary line

    # the same run in this process, on the model loaded as the CLI loads it (attention
    # implementation included) and with one thread, as each torchrun worker
    from gradsae.commands.score import load_model

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
    assert ex == ref.examples
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["tokens"] == ref.meta["tokens"]
    for k in ("documents", "sequences", "batches"):
        assert meta[k] == ref.meta[k], k
    assert not (out / "checkpoint").exists()
