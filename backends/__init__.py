"""Built-in backends, one file each with the same function names: numpy_backend (the
reference), torch_backend and jax_backend. Importing this package imports no framework."""
