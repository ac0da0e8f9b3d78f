"""Step 2, sdg: synthetic question-passage pairs (LLM, inverse cloze), their gates."""
