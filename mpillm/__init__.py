"""mpillm: batch inference for Llama-family LLMs over MPI, with a NumPy reference backend and a CUDA backend."""

__version__ = "0.1.0"
