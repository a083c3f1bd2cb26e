"""The paper's studies and the model CLI commands, on a tiny model trained here to answer
its questions as "result = [[ label ]]" and an SAE that reconstructs exactly."""

import json

import pytest
import tiny_models as tm
import torch

from gradsae import experiments as ex
from gradsae.cli import main
from gradsae.errors import InputError
from gradsae.model import GradSAE

HOOK = "blocks.0.hook_resid_post"
N = 4  # questions the model was trained on


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    m, tok = tm.trained_qa_model(n=N)
    sae = tm.identity_sae(m.config.hidden_size)
    sae.meta.hook_name = HOOK
    d = tmp_path_factory.mktemp("qa")
    m.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    sae.save(d / "sae")
    # the trained questions, plus one whose gold answer the model does not give
    rows = list(tm.QA[:N]) + [(tm.QA[0][0], tm.QA[0][1], "king")]
    tm.squad_json(d / "squad.json", rows)
    (d / "template.txt").write_text(tm.QA_TEMPLATE)
    return m, tok, sae, d


def dense_answer(m, sae, prompt_ids, n, zero=()):
    """Greedy answer of the dense-spliced model with latents ``zero`` zeroed everywhere."""
    def edit(z):
        z = z.clone()
        z[..., list(zero)] = 0
        return z

    hook = tm.DenseSplice(tm.layer_module(m, 0), sae, edit=edit)
    ids = prompt_ids
    try:
        with torch.no_grad():
            for _ in range(n):
                nxt = m(ids[None]).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt[None]])
                if int(nxt) == 2:
                    break
    finally:
        hook.remove()
    return ids[len(prompt_ids):]


def test_metrics_and_answer_format():
    assert ex.normalize_answer("The  Denver-Broncos!") == "denverbroncos"
    assert ex.normalize_answer("an apple, a pear") == "apple pear"
    assert ex.exact_match("the Broncos", ["Broncos", "x"]) == 1.0
    assert ex.f1("Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8)
    assert ex.f1("x", ["y"]) == 0.0
    assert ex.extract_answer('Result = [[ American Football Conference ]]') == "American Football Conference"
    assert ex.extract_answer("Result = [ Santa Clara ]") == "Santa Clara"
    assert ex.extract_answer("no brackets") == "no brackets"
    assert ex.parse_ks("1,10,50%") == (1, 10, 0.5)
    with pytest.raises(InputError):
        ex.parse_ks("1,abc")


def test_load_squad(qa, tmp_path):
    *_, d = qa
    rows = ex.load_squad(d / "squad.json")
    assert len(rows) == N + 1 and rows[0]["answers"] == [tm.QA[0][2]]
    assert len(ex.load_squad(d / "squad.json", limit=2)) == 2
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        ex.load_squad(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(InputError, match="not a SQuAD file"):
        ex.load_squad(tmp_path / "other.json")


def test_studies_match_independent_runs(qa):
    m, tok, sae, d = qa
    sc = GradSAE(m, sae, tokenizer=tok)
    examples = ex.load_squad(d / "squad.json")
    res = ex.run_experiments(sc, examples, ks=(1, 0.5), max_new_tokens=8, template=tm.QA_TEMPLATE,
                             progress=False)
    assert res.n_total == N + 1
    assert res.n_kept == N  # the wrong-gold question is dropped
    kept_ids = {r["id"] for r in res.records}
    assert f"q{N}" not in kept_ids and len(kept_ids) == N
    # GradSAE Top-1 masking, re-derived independently per example: dense recipe at the
    # trigger prefix (prompt + "result ="), argmax score, dense-zeroed greedy answer.
    for c, q, a in tm.QA[:N]:
        qid = f"q{tm.QA.index((c, q, a))}"
        rec = next(r for r in res.records if r["id"] == qid and r["study"] == "perturbation"
                   and r["method"] == "gradsae" and r["K"] == 1 and r["selection"] == "top")
        prompt = tok(tm.QA_TEMPLATE.format(context=c, question=q), return_tensors="pt")["input_ids"][0]
        prefix = torch.cat([prompt, tok("result =", return_tensors="pt")["input_ids"][0]])
        ref, z, _ = tm.paper_scores(m, sae, 0, prefix)
        assert rec["latents"] == [int(ref.argmax())]
        want = tok.decode(dense_answer(m, sae, prompt, 8, zero=rec["latents"]).tolist(), skip_special_tokens=True)
        assert rec["answer"] == ex.extract_answer(want)
        assert rec["em"] == ex.exact_match(rec["answer"], [a])
        # the activation baseline ranks by mean activation
        act = next(r for r in res.records if r["id"] == qid and r["study"] == "perturbation"
                   and r["method"] == "activation" and r["K"] == 1 and r["selection"] == "top")
        assert act["latents"] == [int(z.mean(0).argmax())]
        # 50%: half the latents active at the last position
        half = next(r for r in res.records if r["id"] == qid and r["study"] == "perturbation"
                    and r["method"] == "gradsae" and r["K"] == 0.5 and r["selection"] == "top")
        assert len(half["latents"]) == int((z[-1] != 0).sum()) // 2
    # steering: donor latents carry the donor's activations at its last position
    st = [r for r in res.records if r["study"] == "steering" and r["method"] == "gradsae" and r["K"] == 1]
    assert len(st) == N and all(r["donor"] != r["id"] for r in st)
    # rows are the means of the records
    for row in res.rows:
        recs = [r for r in res.records if (r["study"], r["method"], r["K"], r["selection"]) ==
                (row["study"], row["method"], row["K"], row["selection"])]
        assert row["n"] == len(recs) == N
        assert row["em"] == pytest.approx(100 * sum(r["em"] for r in recs) / N)
    table = res.table()
    for word in ("Perturbation", "Steering", "gradsae", "activation", "50%", "Top-K EM", "donor EM"):
        assert word in table


def test_cli_select_ablate_steer_experiment(qa, capsys):
    m, tok, sae, d = qa
    c, q, a = tm.QA[1]
    prompt = tm.QA_TEMPLATE.format(context=c, question=q)
    common = ["--model", str(d / "model"), "--sae", str(d / "sae")]
    assert main(["select", *common, "--prompt", prompt, "--k", "3", "--trigger", "[", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    sc = GradSAE(m, sae, hook=HOOK, tokenizer=tok)
    g = sc.score_at_trigger(prompt, trigger="[", max_new_tokens=50)
    assert [t["latent"] for t in out["top"]] == g.scores.top(3).tolist()
    assert [t["latent"] for t in out["bottom"]] == g.scores.bottom(3).tolist()
    assert out["trigger_step"] == g.trigger_step

    assert main(["ablate", *common, "--prompt", prompt, "--latents", "1,2", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = tok(prompt, return_tensors="pt")["input_ids"][0]
    want = tok.decode(dense_answer(m, sae, ids, 8, zero=[1, 2]).tolist(), skip_special_tokens=True)
    assert out["ablated"] == want and out["latents"] == [1, 2]
    assert ex.extract_answer(out["spliced"]) == a

    assert main(["steer", *common, "--prompt", prompt, "--add", "3=5.0", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    with sc.intervene(add={3: 5.0}):
        assert out["steered"] == sc.generate(prompt, max_new_tokens=8).text

    res_path = d / "results.json"
    assert main(["experiment", *common, "--data", str(d / "squad.json"), "--ks", "1", "--max-new-tokens", "8",
                 "--template-file", str(d / "template.txt"), "--studies", "perturbation", "--no-progress",
                 "--out", str(res_path)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(res_path.read_text())
    assert saved["n_kept"] == N and "Perturbation" in printed and "Steering" not in printed


def test_cli_errors(qa, capsys):
    *_, d = qa
    common = ["--model", str(d / "model"), "--sae", str(d / "sae")]
    assert main(["select", *common, "--prompt", "the king", "--hook", "blocks.9.hook_resid_post"]) == 2
    assert "unknown hook" in capsys.readouterr().err
    assert main(["select", *common, "--prompt", "the king of", "--trigger", "[", "--max-new-tokens", "2"]) == 2
    assert "never predicted" in capsys.readouterr().err
    assert main(["steer", *common, "--prompt", "the king"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert main(["experiment", *common, "--data", str(d / "missing.json")]) == 2


def test_prompt_styles_and_sampling(qa):
    from gradsae.commands.experiment import chat_template

    *_, d = qa
    tok = tm.tokenizer()
    tok.chat_template = "{{ bos_token }}{% for m in messages %}<u> {{ m['content'] }} </u>{% endfor %}<a>"
    t = chat_template(tok, ex.PROMPT)
    text = t.format(context="CTX", question="Q?")
    assert text == "<u> " + ex.PROMPT.format(context="CTX", question="Q?") + " </u><a>"
    assert ex.PROMPT_GEMMA_RELEASED.startswith("<start_of_turn>user\n")
    tok.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        chat_template(tok, ex.PROMPT)
    rows = ex.load_squad(d / "squad.json")
    s1 = ex.load_squad(d / "squad.json", sample=3, seed=1)
    assert len(s1) == 3 and s1 == ex.load_squad(d / "squad.json", sample=3, seed=1)
    assert all(r in rows for r in s1)
    with pytest.raises(InputError, match="cannot sample"):
        ex.load_squad(d / "squad.json", sample=99)


def test_cli_paper_perturbation_and_steering(qa, capsys):
    from gradsae.model import perturbation, steering

    m, tok, sae, d = qa
    common = ["--model", str(d / "model"), "--sae", str(d / "sae"), "--max-new-tokens", "8", "--json"]
    p0 = tm.QA_TEMPLATE.format(context=tm.QA[0][0], question=tm.QA[0][1])
    p1 = tm.QA_TEMPLATE.format(context=tm.QA[1][0], question=tm.QA[1][1])
    sc = GradSAE(m, sae, hook=HOOK, tokenizer=tok)
    own = sc.score_at_trigger(p0, trigger="[", max_new_tokens=8).scores
    don = sc.score_at_trigger(p1, trigger="[", max_new_tokens=8).scores

    assert main(["ablate", "--model", str(d / "model"), "--sae", str(d / "sae"), "--prompt", p0,
                 "--top", "50%", "--trigger", "[", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    edit = perturbation(own, 0.5)
    assert out["latents"] == edit["zero"]
    with sc.intervene(**edit):
        assert out["ablated"] == sc.generate(p0, max_new_tokens=8).text

    assert main(["steer", *common, "--prompt", p0, "--donor", p1, "--k", "3", "--trigger", "["]) == 0
    out = json.loads(capsys.readouterr().out)
    edit = steering(own, don, 3)
    assert out["zero"] == edit["zero"] and out["positions"] == "last"
    # the CLI's model is loaded from disk (its attention kernel may differ): values to float32 precision
    got = {int(k): v for k, v in out["set"].items()}
    assert list(got) == list(edit["set"])
    assert all(abs(got[j] - v) <= 1e-5 * max(1.0, abs(v)) for j, v in edit["set"].items())
    with sc.intervene(**edit):
        assert out["steered"] == sc.generate(p0, max_new_tokens=8).text
