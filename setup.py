from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith("pytest")
]

setup(
    name="dspark",
    version="0.1.0",
    description="Train speculative-decoding drafters (DSpark, DFlash, Eagle3) for large frozen target LLMs",
    packages=find_packages(include=["dspark", "dspark.*"]),
    package_data={"dspark": ["recipes/*.yaml", "recipes/*.py", "data/prompts/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=requirements,
    entry_points={"console_scripts": ["dspark=dspark.cli:main"]},
)
