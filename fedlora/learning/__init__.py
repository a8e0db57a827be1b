"""Local learning: the model and its LoRA adapter, client data, local training, evaluation, loading
and export."""
