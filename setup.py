"""Only the C accelerator is declared here; everything else is in pyproject.toml.

``optional=True``: where the extension cannot be built (no C compiler), the
install goes on and tlsproxy runs its pure Python versions instead
(tlsproxy/speedups.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tlsproxy._speedups",
            sources=["tlsproxy/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
