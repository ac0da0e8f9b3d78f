"""The small core every step uses: file formats, params, models and encoders, the embedding store, exact search."""
