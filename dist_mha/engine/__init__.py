"""The attention engine: the one forward both Keras layers run, joining single-device attention with TP/CP."""
