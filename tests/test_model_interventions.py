"""Interventions change exactly what they should: compared with dense edits of z written in
the test (tests/tiny_models.dense_encode / dense_decode)."""

import warnings

import pytest
import tiny_models as tm
import torch
from oracle import random_sae

from gradsae.errors import GradSAEWarning, InputError
from gradsae.model import GradSAE, PromptScores

D, DSAE = 32, 64


@pytest.fixture
def parts():
    m = tm.model("llama", d=D, scale=3.0).double()
    sae = random_sae(D, DSAE, "topk", k=6, dtype=torch.float64)
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", tokenizer=tm.tokenizer())
    ids = torch.randint(4, tm.VOCAB, (2, 6))
    return m, sae, sc, ids


def hook_io(m, ids):
    """(input of layer 0's output hook = raw resid_post, what layer 1 receives)."""
    raw, seen = [], []
    h0 = m.model.layers[0].register_forward_hook(lambda mod, a, out: raw.append(
        (out[0] if isinstance(out, tuple) else out).detach().clone()), prepend=True)
    h1 = m.model.layers[1].register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            m(ids)
    finally:
        h0.remove()
        h1.remove()
    return raw[0], seen[0]


def active_latents(sae, x, n=2):
    z = tm.dense_encode(sae, x)
    counts = (z != 0).sum((0, 1))
    return torch.argsort(counts, descending=True)[:n].tolist(), z


def test_zero_at_all_positions(parts):
    m, sae, sc, ids = parts
    with sc.spliced():
        x, spliced = hook_io(m, ids)
    J, z = active_latents(sae, x)
    assert torch.allclose(spliced, tm.dense_decode(sae, z), atol=1e-10)
    with sc.intervene(zero=J):
        _, got = hook_io(m, ids)
    z2 = z.clone()
    z2[..., J] = 0
    assert torch.allclose(got, tm.dense_decode(sae, z2), atol=1e-10)
    assert not torch.allclose(got, spliced)
    # outside the block the model is its own again
    _, plain = hook_io(m, ids)
    assert torch.equal(plain, x)


def test_zero_at_last_position_only(parts):
    m, sae, sc, ids = parts
    with sc.spliced():
        x, spliced = hook_io(m, ids)
    z = tm.dense_encode(sae, x)
    J = torch.nonzero(z[:, -1] != 0)[:, 1].unique().tolist()
    with sc.intervene(zero=J, positions="last"):
        _, got = hook_io(m, ids)
    z2 = z.clone()
    z2[:, -1, J] = 0
    assert torch.allclose(got[:, :-1], spliced[:, :-1], atol=0)
    assert torch.allclose(got, tm.dense_decode(sae, z2), atol=1e-10)
    assert not torch.allclose(got[:, -1], spliced[:, -1])


@pytest.mark.parametrize("positions", ["all", "last"])
def test_set_latents_to_values(parts, positions):
    m, sae, sc, ids = parts
    x, _ = hook_io(m, ids)
    (j_on,), z = active_latents(sae, x, 1)
    j_off = int(torch.nonzero((z != 0).sum((0, 1)) == 0)[0])
    vals = {j_on: 2.5, j_off: -1.25}
    with sc.intervene(set=vals, positions=positions):
        _, got = hook_io(m, ids)
    z2 = z.clone()
    sl = slice(None) if positions == "all" else slice(-1, None)
    for j, v in vals.items():
        z2[:, sl, j] = v
    assert torch.allclose(got, tm.dense_decode(sae, z2), atol=1e-10)


def test_add_decoder_direction(parts):
    m, sae, sc, ids = parts
    with sc.spliced():
        _, spliced = hook_io(m, ids)
    with sc.intervene(add={3: 4.0, 10: -0.5}):
        _, got = hook_io(m, ids)
    assert torch.allclose(got, spliced + 4.0 * sae.W_dec[3] - 0.5 * sae.W_dec[10], atol=1e-10)


def test_error_mode_interventions_keep_the_error_term(parts):
    m, sae, _, ids = parts
    sc = GradSAE(m, sae, hook="blocks.0.hook_resid_post", mode="error")
    with sc.spliced():
        x, same = hook_io(m, ids)
    assert torch.equal(same, x)
    J, z = active_latents(sae, x)
    with sc.intervene(zero=J):
        _, got = hook_io(m, ids)
    z2 = z.clone()
    z2[..., J] = 0
    assert torch.allclose(got, x + tm.dense_decode(sae, z2) - tm.dense_decode(sae, z), atol=1e-10)


def test_nested_blocks_combine_and_unwind(parts):
    m, sae, sc, ids = parts
    with sc.spliced():
        _, spliced = hook_io(m, ids)
    with sc.intervene(add={1: 1.0}):
        with sc.intervene(add={2: 1.0}):
            _, both = hook_io(m, ids)
        _, one = hook_io(m, ids)
    assert torch.allclose(both, spliced + sae.W_dec[1] + sae.W_dec[2], atol=1e-10)
    assert torch.allclose(one, spliced + sae.W_dec[1], atol=1e-10)
    assert not m.model.layers[0]._forward_hooks and sc.splice.interventions == []


def manual_greedy(m, sae, ids, n, edit=None, last_only=False):
    """Greedy decoding without cache through a dense splice with an optional edit of z."""
    def ed(z):
        if edit is None:
            return z
        z2 = edit(z.clone())
        if last_only:
            z2 = torch.cat([z[:, :-1], z2[:, -1:]], dim=1)
        return z2

    hook = tm.DenseSplice(m.model.layers[0], sae, edit=ed)
    try:
        with torch.no_grad():
            for _ in range(n):
                nxt = m(ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
    finally:
        hook.remove()
    return ids[0]


@pytest.mark.parametrize("positions", ["all", "last"])
def test_interventions_act_on_every_generation_step(parts, positions):
    m, sae, sc, _ = parts
    prompt = torch.randint(4, tm.VOCAB, (5,))
    x, _ = hook_io(m, prompt[None])
    J, _ = active_latents(sae, x, 3)

    def edit(z):
        z[..., J] = 0
        z[..., 5] = 3.0
        return z

    base = sc.generate(prompt, max_new_tokens=6, stop_ids=[])
    assert torch.equal(torch.cat([prompt, base.token_ids]), manual_greedy(m, sae, prompt[None], 6))
    with sc.intervene(zero=J, set={5: 3.0}, positions=positions):
        got = sc.generate(prompt, max_new_tokens=6, stop_ids=[])
    want = manual_greedy(m, sae, prompt[None], 6, edit, last_only=positions == "last")
    assert torch.equal(torch.cat([prompt, got.token_ids]), want)


def test_bad_interventions(parts):
    _, _, sc, _ = parts
    with pytest.raises(InputError, match="latent indices"), sc.intervene(zero=[DSAE]):
        pass
    with pytest.raises(InputError, match="latent indices"), sc.intervene(set={-1: 2.0}):
        pass
    with pytest.raises(InputError, match="positions"), sc.intervene(zero=[1], positions="first"):
        pass


def test_paper_perturbation_and_steering_arguments(parts):
    from gradsae.model import perturbation, steering

    m, sae, sc, _ = parts
    own = sc.score(torch.randint(4, tm.VOCAB, (7,)))
    donor = sc.score(torch.randint(4, tm.VOCAB, (9,)))
    p = perturbation(own, 3)
    assert p == {"zero": own.top(3).tolist(), "positions": "all"}
    assert perturbation(own, 0.5, "bottom")["zero"] == own.bottom(0.5, strict=False).tolist()
    with warnings.catch_warnings():  # donor latents inactive at its last position: tested below
        warnings.simplefilter("ignore", GradSAEWarning)
        s = steering(own, donor, 2)
    assert s["zero"] == own.top(2).tolist() and s["positions"] == "last"
    assert list(s["set"]) == [j for j in donor.top(2).tolist() if donor.last_acts[j] != 0]
    for j, v in s["set"].items():
        assert v == float(donor.last_acts[j])
    assert steering(own, donor, 2, values="score", positions="all")["set"] == {
        int(j): float(donor.scores[j]) for j in donor.top(2)}
    with pytest.raises(InputError, match="donor values"):
        steering(own, donor, 2, values="max")
    with sc.intervene(**s):  # a valid intervention
        pass


def test_steering_skips_donor_latents_inactive_at_its_last_position():
    """Setting a donor latent that is 0 at the donor's last position would zero it in the
    steered prompt: it is left out, and a warning names it."""
    from gradsae.model import donor_values, steering

    def scores(s, last):
        s, last = torch.tensor(s), torch.tensor(last)
        return PromptScores(scores=s, active=s > 0, active_last=torch.nonzero(last).flatten(), last_acts=last,
                            mean_acts=s / 10, objective=0.5)

    own = scores([0.0, 0.1, 0.2, 0.3, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0])
    donor = scores([0.0, 3.0, 2.0, 1.0, 0.5], [0.0, 0.0, 0.5, 0.7, 0.0])  # top-3: 1, 2, 3; 1 inactive last
    with pytest.warns(GradSAEWarning, match=r"donor latents \[1\] are not active at the donor's last position"):
        s = steering(own, donor, 3)
    assert s["set"] == {2: 0.5, 3: pytest.approx(0.7)} and s["zero"] == [3, 2, 1]
    with pytest.warns(GradSAEWarning, match=r"\[1, 4\]"):
        assert donor_values(donor, [1, 2, 4]) == {2: 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # other values: every latent has one, nothing to say
        assert set(steering(own, donor, 3, values="mean")["set"]) == {1, 2, 3}
        assert donor_values(donor, [2, 3]) == {2: 0.5, 3: pytest.approx(0.7)}
