"""CPU kernels and process settings: oneDNN Linears (onednn.py), math attention (attention.py), threads and
the allocator (runtime.py). Chosen by the [runtime] config section through backends.convert_model."""
