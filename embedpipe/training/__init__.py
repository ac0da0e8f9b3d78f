"""Step 4, finetune: training data, losses, the trainer, WiSE-FT."""
