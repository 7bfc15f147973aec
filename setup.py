from setuptools import find_packages, setup

setup(
    name="qdm-engine",
    version="0.1.0",
    description="Feature-by-feature audit of whether a compressed LM keeps its SAE features",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["qdm_engine", "qdm_engine.*"]),
    package_data={"qdm_engine": ["data/**/*", "data/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "safetensors",
        "numpy",
        "pandas",
        "pyarrow",
        "tqdm",
        "scipy",
        "scikit-learn",
        "matplotlib",
    ],
    extras_require={
        "sae": ["sae-lens>=6"],
        "gguf": ["gguf"],
        "methods": ["llmcompressor", "compressed-tensors", "bitsandbytes", "hqq", "gguf"],
        "triton": ["triton"],
        "test": ["pytest", "scipy"],
    },
    entry_points={"console_scripts": ["qdm-engine=qdm_engine.cli:main"]},
)
