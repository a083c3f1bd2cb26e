"""Where the model layer's features meet: several SAEs with a transcoder among them, and the
methods beyond the first-order score (which serve one SAE at one hook) refusing what they do
not serve in one line."""

import pytest
import tiny_models as tm
import torch
from oracle import random_sae
from test_model_transcoder import transcoder

from gradsae.errors import InputError
from gradsae.model import GradSAE

D = 32


def _multi(mode="error"):
    m = tm.model("gpt2", d=D, scale=3.0).double()
    saes = {"blocks.0.hook_resid_post": random_sae(D, 96, "topk", k=6, dtype=torch.float64, seed=1),
            "blocks.1.ln2.hook_normalized": transcoder("topk")}
    return m, saes, GradSAE(m, saes, mode=mode, tokenizer=tm.tokenizer(padding_side="right"))


@pytest.mark.parametrize("mode", ["error", "splice"])
def test_a_transcoder_among_several_saes(mode):
    """Error mode: each hook's scores equal a run with that SAE (or transcoder) alone."""
    m, saes, multi = _multi(mode)
    texts = ["the king of the north was red", "what river is blue ?"]
    attr = multi.attribute(texts, objective="loss")
    assert list(attr.influences) == list(saes)
    assert multi.splices["blocks.1.ln2.hook_normalized"].point.name == "blocks.1.hook_mlp_out"
    if mode == "error":
        for h, sae in saes.items():
            one = GradSAE(m, sae, hook=h, mode=mode, tokenizer=tm.tokenizer(padding_side="right"))
            ref = one.attribute(texts, objective="loss").influence
            got = attr.influences[h]
            assert torch.equal(got.indices, ref.indices)
            torch.testing.assert_close(got.scores, ref.scores, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("call", [
    lambda s: s.score("the king", method="ig"),
    lambda s: s.score("the king", method="exact"),
    lambda s: s.score("the king", baseline="the queen"),
    lambda s: s.validate(["the king"], K=2),
])
def test_methods_refuse_several_saes_and_transcoders(call):
    _, _, multi = _multi()
    with pytest.raises(InputError, match="one SAE"):
        call(multi)
    m = tm.model("gpt2", d=D, scale=3.0).double()
    tc = GradSAE(m, transcoder("topk"), mode="error", tokenizer=tm.tokenizer(padding_side="right"))
    with pytest.raises(InputError, match="not offered for transcoders"):
        call(tc)
    assert tc.attribute(["the king"], objective="loss").error is None   # no error node for a transcoder


def test_studies_refuse_a_scorer_with_several_saes():
    from gradsae.experiments import run_experiments

    _, _, multi = _multi()
    with pytest.raises(InputError, match="studies score one SAE"):
        run_experiments(multi, [{"context": "a", "question": "b", "answers": ["c"]}], progress=False)
