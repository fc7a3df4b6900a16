"""Installable package for the SaSaSa2VA reimplementation (library code lives in ``projects/``)."""
from setuptools import find_packages, setup

setup(
    name="sasasa2va",
    version="0.1.0",
    description="SaSaSa2VA: Segmentation Augmented and Selective Averaged Sa2VA (reimplementation)",
    packages=find_packages(include=["projects", "projects.*"]),
    package_data={"projects.sasasa2va": ["**/*.yaml", "**/*.json"]},
    python_requires=">=3.10",
)
