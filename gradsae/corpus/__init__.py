"""Corpus-scale GradSAE scoring: read a corpus, batch it, attribute every token, and keep
per-latent statistics and top examples by influence, with checkpoints and torchrun support.

    res = gradsae.score_corpus(model, sae, "corpus.jsonl", hook="blocks.6.hook_resid_post",
                               tokenizer=tok, out="runs/l6")
    res.stats.top(20)                      # LatentStats
    res.examples.rows(latent)              # TopExamples

Modules: :mod:`.config` (``RunConfig``, the run's settings), :mod:`.data` (readers),
:mod:`.batching` (tokenise, window, pack), :mod:`.examples` (top-N per latent),
:mod:`.preflight` (checks before the first batch), :mod:`.resume` (output directory policy,
checkpoints, resume checks), :mod:`.distributed` (torch.distributed reduce), :mod:`.report`
(output directory), :mod:`.run` (``score_corpus``: setup, loop, finish).
"""

from .config import RunConfig
from .data import Corpus, open_corpus
from .examples import TopExamples
from .resume import RunInterrupted, RunIOError
from .run import CorpusResult, HookResult, run_corpus, score_corpus

__all__ = ["score_corpus", "run_corpus", "RunConfig", "CorpusResult", "HookResult", "TopExamples", "open_corpus", "Corpus",
           "RunInterrupted", "RunIOError"]
