import torch

# The fits run many small float64 matrix products; on a shared CI machine whose other cores
# are busy, multi-threaded BLAS turns each into a spin-wait (100x slower at 24 x 24). One
# thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)
