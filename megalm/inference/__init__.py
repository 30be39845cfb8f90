"""Inference on trained checkpoints: `megalm eval` (loss, perplexity, bits per byte, cloze accuracy) and
`megalm generate` (sampling with a key/value cache)."""
