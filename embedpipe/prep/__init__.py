"""Step 3, prep: hard-negative mining and the optional teacher."""
