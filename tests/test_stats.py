"""LatentStats: accumulation against dense computations, merge, save/load."""

import pytest
import torch
from oracle import dense_oracle, random_sae

import gradsae


def _dense_expectation(orc, mask=None):
    z, s = orc["z"], orc["z"] * orc["g"]
    if mask is not None:
        z, s = z[mask.reshape(-1)], s[mask.reshape(-1)]
    act = z != 0
    return {
        "count": act.sum(0),
        "act_sum": z.sum(0),
        "score_sum": s.sum(0),
        "relu_sum": s.relu().sum(0),
        "abs_sum": s.abs().sum(0),
        "score_max": torch.where(act, s, torch.tensor(float("-inf"), dtype=s.dtype)).amax(0),
        "tokens": z.shape[0],
    }


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_update_matches_dense(activation):
    sae = random_sae(12, 60, activation, k=5, dtype=torch.float64)
    x = torch.randn(4, 6, 12, dtype=torch.float64)
    g = torch.randn_like(x)
    mask = torch.rand(4, 6) > 0.3
    stats = gradsae.LatentStats(60).update(gradsae.influence(x, g, sae), mask=mask)
    want = _dense_expectation(dense_oracle(sae, x, g), mask)
    assert stats.tokens == int(mask.sum()) == want["tokens"]
    assert torch.equal(stats.count, want["count"])
    for f in ("act_sum", "score_sum", "relu_sum", "abs_sum", "score_max"):
        torch.testing.assert_close(getattr(stats, f), want[f], msg=f)
    freq = want["count"].double() / want["tokens"]
    torch.testing.assert_close(stats.frequency, freq)
    never = want["count"] == 0
    assert bool((stats.mean_act[never] == 0).all())
    torch.testing.assert_close(stats.mean_act[~never], (want["act_sum"] / want["count"])[~never])


def test_merge_equals_single_pass():
    # Both sides add the same per-token values (one influence call, split by rows), so counts
    # and max are exactly equal whatever BLAS does; sums differ only by float64 reassociation.
    # (Scoring each part separately would run GEMMs of other shapes, whose last bits differ
    # between CPUs.)
    sae = random_sae(12, 60, "topk", k=5, dtype=torch.float64)
    x = torch.randn(21, 12, dtype=torch.float64)
    inf = gradsae.influence(x, torch.randn_like(x), sae)
    whole = gradsae.LatentStats(60).update(inf)
    rows = [slice(0, 7), slice(7, 15), slice(15, 21)]
    parts = [
        gradsae.LatentStats(60).update(
            gradsae.Influence(inf.indices[r], inf.acts[r], inf.grads[r], inf.scores[r], inf.d_sae))
        for r in rows
    ]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.tokens == whole.tokens == 21
    assert torch.equal(merged.count, whole.count)
    assert torch.equal(merged.score_max, whole.score_max)
    for f in ("act_sum", "score_sum", "relu_sum", "abs_sum"):
        torch.testing.assert_close(getattr(merged, f), getattr(whole, f), rtol=1e-12, atol=1e-12)


def test_merge_of_separately_scored_shards_is_close():
    # Shards scored on their own (other GEMM shapes): equal up to rounding, never bitwise.
    sae = random_sae(12, 60, "topk", k=5, dtype=torch.float64)
    xs = [torch.randn(7, 12, dtype=torch.float64) for _ in range(3)]
    gs = [torch.randn_like(x) for x in xs]
    whole = gradsae.LatentStats(60).update(gradsae.influence(torch.cat(xs), torch.cat(gs), sae))
    parts = [gradsae.LatentStats(60).update(gradsae.influence(x, g, sae)) for x, g in zip(xs, gs)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.tokens == whole.tokens == 21
    assert torch.equal(merged.count, whole.count)
    for f in ("score_max", "act_sum", "score_sum", "relu_sum", "abs_sum"):
        torch.testing.assert_close(getattr(merged, f), getattr(whole, f), rtol=1e-10, atol=1e-10)


def test_save_load_roundtrip(tmp_path):
    sae = random_sae(12, 60, "topk", k=5)
    x = torch.randn(9, 12)
    stats = gradsae.LatentStats(60).update(gradsae.influence(x, torch.randn_like(x), sae))
    p = tmp_path / "sub" / "stats.safetensors"
    stats.save(p)
    back = gradsae.LatentStats.load(p)
    assert back == stats
    assert not list(p.parent.glob("*.tmp")), "temporary file left behind"


def test_save_is_byte_identical_across_processes(tmp_path):
    # safetensors orders metadata by a per-process hash seed; gradsae sorts it, so identical
    # statistics give identical files in every process.
    import subprocess
    import sys

    sae = random_sae(12, 60, "topk", k=5)
    x = torch.randn(9, 12)
    stats = gradsae.LatentStats(60).update(gradsae.influence(x, torch.randn_like(x), sae))
    stats.save(tmp_path / "a.safetensors")
    prog = ("import sys, gradsae; s = gradsae.LatentStats.load(sys.argv[1]); s.save(sys.argv[2])")
    outs = []
    for i in range(3):
        dst = tmp_path / f"b{i}.safetensors"
        subprocess.run([sys.executable, "-c", prog, str(tmp_path / "a.safetensors"), str(dst)], check=True)
        outs.append(dst.read_bytes())
    assert all(o == (tmp_path / "a.safetensors").read_bytes() for o in outs)
    assert gradsae.LatentStats.load(tmp_path / "b0.safetensors") == stats


def test_load_rejects_foreign_and_missing_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(gradsae.InputError, match="no such file"):
        gradsae.LatentStats.load(tmp_path / "nope.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(gradsae.InputError, match="not a gradsae LatentStats file"):
        gradsae.LatentStats.load(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(gradsae.InputError, match="not a readable safetensors"):
        gradsae.LatentStats.load(junk)


def test_mismatched_sizes_are_refused():
    a, b = gradsae.LatentStats(10), gradsae.LatentStats(11)
    with pytest.raises(gradsae.InputError, match="d_sae=11 into d_sae=10"):
        a.merge(b)
    sae = random_sae(4, 11, "topk", k=2)
    x = torch.randn(2, 4)
    with pytest.raises(gradsae.InputError, match="d_sae=11 but these stats have d_sae=10"):
        a.update(gradsae.influence(x, x, sae))


def test_top_ranks_by_field():
    sae = random_sae(12, 60, "topk", k=5, dtype=torch.float64)
    x = torch.randn(30, 12, dtype=torch.float64)
    stats = gradsae.LatentStats(60).update(gradsae.influence(x, torch.randn_like(x), sae))
    idx, vals = stats.top(5, by="relu_sum")
    assert torch.equal(vals, stats.relu_sum.sort(descending=True).values[:5])
    assert torch.equal(stats.relu_sum[idx], vals)
