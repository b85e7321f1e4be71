"""The Keras-facing layers: Keras's constructor and call signatures, weights and configs."""
