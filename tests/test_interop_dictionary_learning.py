"""SAE.from_object on live dictionary_learning dictionaries: encode (with its default
arguments), decode and influence equal the library's own.

dictionary-learning is not in the ``compat`` extra (its nnsight<0.4 pin pulls a CUDA-only
torchvision that does not load against the CPU torch), so these tests run where it has been
installed by hand, e.g. ``pip install -c constraints.txt dictionary-learning && pip uninstall
torchvision``."""

import pytest
import torch

pytest.importorskip(
    "dictionary_learning",
    reason="dictionary-learning is not installed (left out of the compat extra: its nnsight pin pulls a "
    "torchvision build that breaks transformers on CPU torch)",
)

import gradsae  # noqa: E402
from dictionary_learning import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder  # noqa: E402
from dictionary_learning.dictionary import AutoEncoderNew  # noqa: E402
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE  # noqa: E402
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE  # noqa: E402
from dictionary_learning.trainers.top_k import AutoEncoderTopK  # noqa: E402
from gradsae.errors import InputError  # noqa: E402
from interop_helpers import (  # noqa: E402
    assert_encode_decode_equal,
    assert_influence_matches_library,
    randomize,
)

D_IN, D = 16, 64


def make(name):
    """A dictionary of class ``name`` with random float64 weights (and thresholds)."""
    ctor = {
        "AutoEncoder": lambda: AutoEncoder(D_IN, D),
        "AutoEncoderNew": lambda: AutoEncoderNew(D_IN, D),
        "GatedAutoEncoder": lambda: GatedAutoEncoder(D_IN, D),
        "JumpReluAutoEncoder": lambda: JumpReluAutoEncoder(D_IN, D),
        "JumpReluAutoEncoder-b_dec_in": lambda: JumpReluAutoEncoder(D_IN, D),
        "AutoEncoderTopK": lambda: AutoEncoderTopK(D_IN, D, 5),
        "BatchTopKSAE": lambda: BatchTopKSAE(D_IN, D, 5),
        "BatchTopKSAE-untrained": lambda: BatchTopKSAE(D_IN, D, 5),
        "MatryoshkaBatchTopKSAE": lambda: MatryoshkaBatchTopKSAE(D_IN, D, 5, [16, 16, 32]),
    }[name]
    ae = randomize(ctor().double())
    with torch.no_grad():
        if name == "JumpReluAutoEncoder-b_dec_in":
            ae.apply_b_dec_to_input = True
        if name.startswith("JumpRelu"):
            ae.threshold.copy_(torch.rand_like(ae.threshold) * 2 - 0.5)
        if name in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
            ae.threshold.fill_(float(torch.rand(())) + 0.2)   # a learned threshold (untrained: -1)
    if name == "MatryoshkaBatchTopKSAE":
        ae.active_groups = 2   # only the first two groups (32 latents) may activate
    return ae


NAMES = ["AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "JumpReluAutoEncoder-b_dec_in",
         "AutoEncoderTopK", "BatchTopKSAE", "BatchTopKSAE-untrained", "MatryoshkaBatchTopKSAE"]


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_equal_dictionary_learning(name):
    ae = make(name)
    sae = gradsae.SAE.from_object(ae)
    x = torch.randn(13, D_IN, dtype=torch.float64)
    assert_encode_decode_equal(sae, ae.encode, ae.decode, x)
    if name == "MatryoshkaBatchTopKSAE":
        assert not bool(sae.encode(x)[:, 32:].any())


@pytest.mark.parametrize("name", ["GatedAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"])
def test_influence_equals_autograd_through_dictionary_learning_decode(name):
    ae = make(name)
    assert_influence_matches_library(ae, ae.encode, ae.decode, torch.randn(13, D_IN, dtype=torch.float64))


def test_unsupported_dictionary_is_refused():
    from dictionary_learning.dictionary import IdentityDict

    with pytest.raises(InputError, match="IdentityDict"):
        gradsae.SAE.from_object(IdentityDict(D_IN))
