"""What is done with a trained encoder: reconstruct, embed (and the sliding-window inference they share)."""
