"""causal_attn: Causal Attention Tuning at the cost of flash attention."""
from .attention import attention, register_backend
from .graph import CausalGraph
from .loss import causal_ratio, re_attention_loss
from .reference import reference_attention

__version__ = "0.1.0"

__all__ = ["attention", "reference_attention", "CausalGraph", "re_attention_loss", "causal_ratio",
           "patch_model", "register_backend"]


def __getattr__(name):  # patch_model pulls in transformers: import it only when asked for
    if name in ("patch_model", "CATTrainer"):
        from . import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'causal_attn' has no attribute {name!r}")
