"""Built-in backends, one folder per framework with the same file names in each
(Keras 3's layout): numpy/ (the reference), torch/ and jax/, each with kernels.py,
runtime.py and attention.py, assembled into a backend by its __init__.py; and
cpu_kernel/, the C++ decode-attention kernel torch's attention calls on the CPU.
Importing this package imports no framework."""
