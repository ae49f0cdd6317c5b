"""causal_attn: Causal Attention Tuning at the cost of flash attention."""
from .utils.layout import attach_folders

attach_folders()

from .ops.attention import attention, reference_attention  # noqa: E402
from .ops.backends import register_backend  # noqa: E402
from .ops.graph import CausalGraph  # noqa: E402
from .ops.loss import causal_ratio, re_attention_loss  # noqa: E402

__version__ = "0.1.0"

__all__ = ["attention", "reference_attention", "CausalGraph", "re_attention_loss", "causal_ratio",
           "patch_model", "register_backend", "CATTrainer", "pretrained"]


def __getattr__(name):  # these pull in transformers: imported only when asked for
    if name == "patch_model":
        from .hf.patch import patch_model

        return patch_model
    if name == "pretrained":  # the GGUF checkpoint loader module (README: pretrained.load)
        from .hf import pretrained

        return pretrained
    if name == "CATTrainer":
        from .hf.trainer import CATTrainer

        return CATTrainer
    raise AttributeError(f"module 'causal_attn' has no attribute {name!r}")
