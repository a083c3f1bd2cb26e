"""GradSAE on transformers models: hook resolution, the spliced SAE, objectives, scoring,
generation and interventions. Imports nothing from transformers."""

from .generation import Generation, generate, score_at_trigger
from .hooks import HookPoint, attach_replacement, resolve_hook, valid_names
from .interventions import Intervention, donor_values, perturbation, steering
from .results import PromptScores, ScoreResult
from .scorer import Attribution, GradSAE
from .splice import Splice

__all__ = [
    "Attribution",
    "Generation",
    "GradSAE",
    "HookPoint",
    "Intervention",
    "PromptScores",
    "ScoreResult",
    "Splice",
    "attach_replacement",
    "donor_values",
    "generate",
    "perturbation",
    "resolve_hook",
    "score_at_trigger",
    "steering",
    "valid_names",
]
