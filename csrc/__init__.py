"""CUDA C++ sources of the extension gradsae._C and their build (csrc/build.py)."""
