"""Only the optional C accelerator lives here; all metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("sketch._blockhash", ["sketch/_blockhash.c"], extra_compile_args=["-O3"], optional=True),
    ]
)
