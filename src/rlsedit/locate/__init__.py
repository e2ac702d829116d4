"""The shared "locate" half of locate-then-edit: context templates, keys and target hidden states.

Written once for every editor; editors only differ in how they solve for the weight change.
"""

from rlsedit.locate.keys import compute_hidden, compute_keys
from rlsedit.locate.targets import TargetConfig, TargetResult, compute_targets
from rlsedit.locate.templates import generate_context_templates
from rlsedit.locate.tokens import EncodedBatch, encode_prompts

__all__ = [
    "EncodedBatch",
    "TargetConfig",
    "TargetResult",
    "compute_hidden",
    "compute_keys",
    "compute_targets",
    "encode_prompts",
    "generate_context_templates",
]
