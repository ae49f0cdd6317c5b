"""causal_attn: Causal Attention Tuning at the cost of flash attention."""
from ._layout import attach_kernels

attach_kernels()

from .attention import attention, reference_attention  # noqa: E402
from .backends import register_backend  # noqa: E402
from .graph import CausalGraph  # noqa: E402
from .loss import causal_ratio, re_attention_loss  # noqa: E402

__version__ = "0.1.0"

__all__ = ["attention", "reference_attention", "CausalGraph", "re_attention_loss", "causal_ratio",
           "patch_model", "register_backend"]


def __getattr__(name):  # these pull in transformers: imported only when asked for
    if name == "patch_model":
        from .patch import patch_model

        return patch_model
    if name == "CATTrainer":
        from .trainer import CATTrainer

        return CATTrainer
    raise AttributeError(f"module 'causal_attn' has no attribute {name!r}")
