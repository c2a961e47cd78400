import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import oracle.py
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads only add sync

# Without a GPU, the Triton kernels (longcat_ref/kernels) run in Triton's CPU interpreter; the variable must be set
# before a kernel module is first imported. On a CUDA machine they run natively.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
