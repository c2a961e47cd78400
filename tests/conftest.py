import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import oracle.py
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads only add sync
