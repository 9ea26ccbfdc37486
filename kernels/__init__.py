"""Triton kernels: fused window attention (window_attention.py) and prior cross-attention
(prior_attention.py). Importing this package needs no GPU; the kernels compile on first use
on a CUDA device, or run in Triton's interpreter with TRITON_INTERPRET=1."""
