from setuptools import setup

setup(
    name="fusedlora",
    version="0.1.0",
    description="Fused Triton kernels for LoRA linear layers: forward, backward, dropout, multi-adapter serving",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships as fusedlora.kernels: a top-level `kernels` would clash with the PyPI package of
    # that name, which transformers can import.
    packages=["fusedlora", "fusedlora.core", "fusedlora.plans", "fusedlora.ops", "fusedlora.modules",
              "fusedlora.peft", "fusedlora.serving", "fusedlora.kernels"],
    package_dir={"fusedlora": "fusedlora", "fusedlora.kernels": "kernels"},
    package_data={"fusedlora.kernels": ["configs/*.json"]},  # per-GPU tuned tables
    # Floors are the oldest releases tested (tests/compat/matrix.py, docs/testing.md). Triton: every
    # minor from 3.6 on runs the kernel tests in the interpreter; 3.6 is the GPU machine's (with torch
    # 2.11), the oldest Triton that has run these kernels on a GPU. torch: only 2.13 (CPU) runs here;
    # 2.11 is the GPU machine's.
    install_requires=["torch>=2.11", "triton>=3.6", "safetensors"],
    extras_require={
        # patch_peft and the adapter files: peft 0.17 does not import with transformers 5, and
        # transformers 5.4 is the oldest under which every PEFT-interop test passes.
        "peft": ["peft>=0.18.0", "transformers>=5.4.0"],
        # parameterized: PEFT's own test_mixed.py, which tests/test_peft_suite.py runs. bitsandbytes: the
        # QLoRA/QDoRA tests (its 4-bit Linear layers run on CPU; the wheel is on PyPI for x86-64 Linux).
        # pytest-random-order: the suite is checked in random order too.
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "pytest-random-order", "hypothesis",
                 "peft>=0.18.0", "transformers>=5.4.0", "matplotlib", "parameterized", "bitsandbytes"],
        "bench": ["peft>=0.18.0", "transformers>=5.4.0", "pytest-benchmark", "matplotlib"],
    },
)
