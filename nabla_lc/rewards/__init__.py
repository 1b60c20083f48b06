"""Rewards the engine can optimize against: outcome and process reward models, a LoRA head on the
policy, the policy as its own judge, and plain Python verifiers."""

from .base import NoGradientError, RewardAdapter, RewardPrefix, Scores, SoftScore
from .classifier import SequenceClassifierReward
from .implicit import ImplicitLoRAReward
from .judge import SelfJudgeReward
from .lora import LoRAReward
from .process import ProcessReward, aggregate
from .transformer import TransformerReward
from .verifier import VerifierReward
from .vocab import VocabMap, VocabMismatchError, check_vocab

__all__ = [
    "ImplicitLoRAReward",
    "LoRAReward",
    "NoGradientError",
    "ProcessReward",
    "RewardAdapter",
    "RewardPrefix",
    "Scores",
    "SelfJudgeReward",
    "SequenceClassifierReward",
    "SoftScore",
    "TransformerReward",
    "VerifierReward",
    "VocabMap",
    "VocabMismatchError",
    "aggregate",
    "check_vocab",
]
