"""kvferry kernels package."""
