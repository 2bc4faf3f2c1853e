"""The training runtime pre-training and fine-tuning share (growing: see the issues)."""
