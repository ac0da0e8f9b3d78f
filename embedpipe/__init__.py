"""Shared logic of the embedding fine-tuning pipeline; the stages in `stages/` import it."""
