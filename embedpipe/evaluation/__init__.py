"""Step 5, eval: metrics, significance, the comparison report."""
