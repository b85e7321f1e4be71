"""Context parallelism: the sequence layout across the CP group, ring attention and Ulysses."""
