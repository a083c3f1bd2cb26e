"""The demo's synthetic task: key-value lookup answered in the paper's ``Result = [[ label ]]``
format.

An example lists a few ``key:value`` pairs and asks for the value of one key:

    k3:v7 , k12:v2 , k5:v9 . Q : k12 -> Result = [[ v2 ]] <eos>

The answer is nowhere but in the prompt, so the model has to find the pair of the queried key
in the context and read its value. The vocabulary is word-level (one token per
space-separated word): every pair ``k:v`` is one token, and keys and values are tokens of their
own, so a prompt cut after ``[[`` is answered by exactly one next token. (Pairs as single
tokens make the lookup one content-based attention step, which a tiny model learns in minutes
on a CPU; with ``k = v`` spelled out it needs an induction circuit and trains far longer.)

Everything here is deterministic given a seed; the training script and the demo draw their
examples from the same generator (with different seeds).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

N_KEYS = 8
N_VALUES = 12
MIN_PAIRS = 2
MAX_PAIRS = 5

KEYS = tuple(f"k{i}" for i in range(N_KEYS))
VALUES = tuple(f"v{i}" for i in range(N_VALUES))
SPECIAL = ("<pad>", "<eos>", "<unk>")
MARKUP = ("=", ",", ".", "Q", ":", "->", "Result", "[[", "]]")
PAIRS = tuple(f"{k}:{v}" for k in KEYS for v in VALUES)
VOCAB = SPECIAL + MARKUP + KEYS + VALUES + PAIRS


@dataclass(frozen=True)
class Example:
    """One lookup: ``pairs`` (key, value) in context order, the queried ``key`` and its
    ``answer`` (the value paired with it)."""

    pairs: tuple[tuple[str, str], ...]
    key: str
    answer: str

    @property
    def context(self) -> str:
        return " , ".join(f"{k}:{v}" for k, v in self.pairs) + " ."

    @property
    def question(self) -> str:
        """The prompt up to the point where the model writes its answer format."""
        return f"{self.context} Q : {self.key} ->"

    @property
    def prompt(self) -> str:
        """The prompt cut right after ``Result = [[``: its next token is the answer."""
        return f"{self.question} Result = [["

    @property
    def text(self) -> str:
        """The full training sequence (without the end-of-sequence token)."""
        return f"{self.prompt} {self.answer} ]]"


def sample(rng: random.Random, min_pairs: int = MIN_PAIRS, max_pairs: int = MAX_PAIRS) -> Example:
    """One example drawn from ``rng``: distinct keys, values drawn with replacement."""
    n = rng.randint(min_pairs, max_pairs)
    keys = rng.sample(KEYS, n)
    vals = [rng.choice(VALUES) for _ in keys]
    i = rng.randrange(n)
    return Example(tuple(zip(keys, vals)), keys[i], vals[i])


def examples(n: int, seed: int, **kw) -> list[Example]:
    """``n`` examples from a generator seeded with ``seed``."""
    rng = random.Random(seed)
    return [sample(rng, **kw) for _ in range(n)]


def build_tokenizer():
    """The word-level fast tokenizer of :data:`VOCAB` (whitespace-split, right padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>", model_max_length=96)
    tok.padding_side = "right"
    return tok
