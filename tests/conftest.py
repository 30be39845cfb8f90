import os

# Must precede any import of a module that defines @triton.jit kernels: the tests check the Triton
# kernels themselves on CPU through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
