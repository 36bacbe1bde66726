from .layer import ExpertsLoraLayer, LinearLoraLayer, SharedMoeLoraLayer, is_fused_experts
from .model import SharedMoeLoraModel, find_targets

__all__ = ["ExpertsLoraLayer", "LinearLoraLayer", "SharedMoeLoraLayer", "SharedMoeLoraModel", "find_targets", "is_fused_experts"]
