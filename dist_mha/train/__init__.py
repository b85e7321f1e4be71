"""Training: distributed start-up, synthetic/text data, checkpoints, the loop, the Hydra app."""
