"""The Hugging Face layer: ``patch_model`` (an AttentionInterface function over the op), ``CATTrainer`` and its
collator, the TRL trainer, distributed loss normalisation, GGUF checkpoint loading and greedy decoding."""
