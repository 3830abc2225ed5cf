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
    install_requires=["torch>=2.6", "triton>=3.2", "safetensors"],
    extras_require={
        # parameterized: PEFT's own test_mixed.py, which tests/test_peft_suite.py runs. bitsandbytes: the
        # QLoRA/QDoRA tests (its 4-bit Linear layers run on CPU; the wheel is on PyPI for x86-64 Linux).
        # pytest-random-order: the suite is checked in random order too.
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "pytest-random-order", "hypothesis", "peft",
                 "transformers", "matplotlib", "parameterized", "bitsandbytes"],
        "bench": ["peft", "transformers", "pytest-benchmark", "matplotlib"],
    },
)
