"""Pure tensor kernels: weights in, factors / codes / masks out. No modules, no widgets."""
