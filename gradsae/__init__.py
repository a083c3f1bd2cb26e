"""gradsae: find the SAE latents that drive a language model's output, fast.

GradSAE (Shu et al., EMNLP 2025) scores latent j at token t by activation x gradient,
``z[t, j] * dY/dz[t, j]``. gradsae computes it for the active latents only, without a dense
``[tokens, d_sae]`` tensor, with interchangeable backends (PyTorch reference, Triton, CUDA).
"""

from .errors import BackendError, CapacityError, GradSAEError, GradSAEWarning, InputError, SAEFormatError
from .loading import load_sae
from .model import Attribution, GradSAE, PromptScores, ScoreResult
from .op import Influence, accumulate_influence, available_backends, encode_sparse, influence, influence_at
from .sae import SAE
from .stats import LatentStats
from .version import __version__

__all__ = [
    "SAE",
    "Influence",
    "LatentStats",
    "influence",
    "encode_sparse",
    "influence_at",
    "accumulate_influence",
    "load_sae",
    "GradSAE",
    "Attribution",
    "PromptScores",
    "ScoreResult",
    "available_backends",
    "GradSAEError",
    "SAEFormatError",
    "InputError",
    "CapacityError",
    "BackendError",
    "GradSAEWarning",
    "__version__",
    "score_corpus",
]


def __getattr__(name):
    # Lazy: the corpus machinery (readers, tqdm, torch.distributed) loads on first use only.
    if name in ("score_corpus", "CorpusResult"):
        from . import corpus

        return getattr(corpus, name)
    raise AttributeError(f"module 'gradsae' has no attribute {name!r}")
