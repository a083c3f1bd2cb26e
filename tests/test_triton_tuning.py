"""Launch policy of the fused kernels, without a GPU: the autotune cap (GRADSAE_AUTOTUNE),
the pruning of configurations that cannot launch, the token-count bucket of the autotune
key, and the split plan that divides the items evenly among the persistent programs."""

import pytest

triton = pytest.importorskip("triton")

from gradsae.kernels import encode_select, tuning  # noqa: E402


def _configs(table):
    return [tuning._cfg(*c) for c in table]


def test_autotune_cap(monkeypatch):
    table = _configs(tuning.hopper_table("topk"))
    monkeypatch.setenv("GRADSAE_AUTOTUNE", "small")
    assert tuning.cap_list(table) == table[:2]
    monkeypatch.setenv("GRADSAE_AUTOTUNE", "off")
    assert tuning.cap_list(table) == table[:1]
    monkeypatch.setenv("GRADSAE_AUTOTUNE", "full")
    assert tuning.cap_list(table) == table
    monkeypatch.setenv("GRADSAE_AUTOTUNE", "tiny")
    with pytest.raises(ValueError, match="GRADSAE_AUTOTUNE"):
        tuning.cap_list(table)


class _X:
    def __init__(self, size):
        self.size = size

    def element_size(self):
        return self.size


def test_prune_drops_configurations_that_cannot_launch():
    cfgs = _configs([(64, 128, 64, 3, 8), (128, 256, 64, 3, 8), (32, 256, 64, 3, 8)])
    # KP=256: BN >= 256, and 128x256 would need 256 KB for its [128, 256] int64 keys
    kept = tuning.prune_encode_configs(cfgs, {"KP": 256, "X": _X(2)})
    assert [(c.kwargs["BM"], c.kwargs["BN"]) for c in kept] == [(32, 256)]
    assert tuning.smem_estimate(128, 256, 64, 3, 256) > tuning.SMEM_PER_BLOCK
    # nothing wide enough: the narrowest is widened, with a shallow pipeline
    kept = tuning.prune_encode_configs(_configs([(64, 128, 64, 3, 8)]), {"KP": 256, "X": _X(2)})
    assert [(c.kwargs["BM"], c.kwargs["BN"], c.num_stages) for c in kept] == [(32, 256, 2)]
    # fp32 inputs take their own list
    kept = tuning.prune_encode_configs(cfgs, {"KP": 64, "X": _X(4)})
    assert all(c.kwargs["BK"] == 32 for c in kept)
    kept = tuning.prune_encode_configs(cfgs, {"THR": None, "X": _X(4)})
    assert [(c.kwargs["BM"], c.kwargs["BN"]) for c in kept][0] == (64, 64)


def test_default_configurations_fit():
    for kind, kp in (("topk", 64), ("topk", 256), ("threshold", 1)):
        for dtype in ("bfloat16", "float32"):
            for bm, bn, bk, stages, warps in tuning.default_encode_configs(kind, kp, dtype):
                assert bn >= kp and bn <= tuning.SPLIT_GRANULE and tuning.SPLIT_GRANULE % bn == 0
                assert tuning.smem_estimate(bm, bn, bk, stages, kp, 4 if dtype == "float32" else 2) \
                    <= tuning.SMEM_PER_BLOCK


def test_n_bucket():
    assert [tuning.n_bucket(n) for n in (1, 64, 65, 8192, 9000, 10**7)] == [64, 64, 128, 8192, 16384, 65536]


@pytest.mark.parametrize("n,d_sae,nprog", [(8192, 131072, 264), (300, 32768, 264), (5, 1 << 21, 264),
                                           (8192, 16384, 264), (1000, 4096, 16)])
def test_split_plan_balances_the_persistent_programs(monkeypatch, n, d_sae, nprog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    S, cols = encode_select.plan_splits(n, d_sae, bm=64, nprog=nprog, slot_bytes=64 * 8)
    assert cols % tuning.SPLIT_GRANULE == 0 and (S - 1) * cols < d_sae <= S * cols
    items = triton.cdiv(n, 64) * S
    assert n * S * 64 * 8 <= encode_select.PARTS_BUDGET or S == 1
    if items >= nprog and S < triton.cdiv(d_sae, tuning.SPLIT_GRANULE):
        assert items >= 4 * nprog or S == triton.cdiv(d_sae, tuning.SPLIT_GRANULE)
        # the last round leaves at most a few percent of the program-slots idle
        assert (-items) % nprog / items <= 0.05, (S, items)


def test_split_plan_at_the_target_shape(monkeypatch):
    """T=8192 on 132 SMs (264 programs): 128 row blocks x 16 equal splits = 2048 items, 7.76
    rounds (3% of the program-slots idle in the last; 3 fixed splits left 27%)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert encode_select.plan_splits(8192, 131072, bm=64, nprog=264, slot_bytes=64 * 8) == (16, 8192)
