"""Task-aware Decoding (TaD): paired base/fine-tuned engine, strategies, scoring, generation and statistics."""
