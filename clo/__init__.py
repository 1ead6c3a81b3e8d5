"""clo: a minimal PyTorch reference implementation of Cross-Lingual Optimization (arXiv 2505.14297)."""
