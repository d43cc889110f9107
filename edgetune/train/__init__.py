"""Training: one interface over the MLX and PyTorch backends."""
