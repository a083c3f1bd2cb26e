"""Build script for gradsae.

The Python package lives in ``gradsae/``; the Triton kernels live in the top-level ``kernels/``
folder and are installed as the subpackage ``gradsae.kernels`` (a top-level ``kernels`` module
would clash with an unrelated PyPI package of that name). Editable installs follow the same
mapping.

The CUDA extension ``gradsae._C`` (csrc/) is built with ``GRADSAE_BUILD_CUDA=1``, or when the
variable is unset and both nvcc and a CUDA build of torch are present (``=0`` never builds it).
"""

import os

from setuptools import find_namespace_packages, find_packages, setup

packages = find_packages(include=["gradsae", "gradsae.*"])
packages += ["gradsae.kernels"] + [
    "gradsae.kernels." + p for p in find_packages(where="kernels")
]
# The bundled demo weights: folders of data files, declared as (namespace) packages so that
# setuptools ships them on purpose.
data_packages = find_namespace_packages(include=["gradsae.data", "gradsae.data.*"])
packages += [p for p in data_packages if p not in packages]


def _want_cuda() -> bool:
    """GRADSAE_BUILD_CUDA=1 builds, =0 does not; unset: build when nvcc and a CUDA torch are here."""
    flag = os.environ.get("GRADSAE_BUILD_CUDA", "")
    if flag:
        return flag != "0"
    try:
        import shutil

        import torch

        return torch.version.cuda is not None and shutil.which("nvcc") is not None
    except ImportError:
        return False


ext_modules = []
cmdclass = {}
if _want_cuda():
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # PEP 517 builds leave it off sys.path
    from csrc.build import cuda_extension  # noqa: E402  (only needed when building CUDA)

    ext, build_cls = cuda_extension()
    ext_modules.append(ext)
    cmdclass["build_ext"] = build_cls

setup(
    name="gradsae",
    version="0.1.0",
    description="Activation x gradient attribution of SAE latents (GradSAE), with fused kernels",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"gradsae": "gradsae", "gradsae.kernels": "kernels"},
    package_data={p: ["*"] for p in data_packages},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.1",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "transformers>=4.40",
        # latents.parquet is a run's main output
        "pyarrow>=12",
    ],
    extras_require={
        # The Triton backend. A CUDA build of torch brings Triton with it; a CPU torch runs the
        # kernels only in Triton's interpreter (the tests do), so it is not a core dependency.
        "triton": ["triton>=3.0; platform_system == 'Linux'"],
        "test": ["pytest>=7", "pytest-benchmark", "pytest-timeout", "datasets",
                 "triton>=3.0; platform_system == 'Linux'"],
        # matplotlib draws report.png and the demo's plot; pandas serves latents_frame()
        "demo": ["matplotlib"],
        "report": ["pandas", "matplotlib"],
        "data": ["datasets"],
        # Libraries whose SAEs / models gradsae accepts as live objects (SAE.from_object,
        # GradSAE on a HookedTransformer); their tests skip without them. dictionary-learning
        # is left out: it needs nnsight<0.4, which pulls a CUDA-only torchvision that does not
        # load against the CPU torch and breaks `transformers` imports.
        "compat": ["sae-lens>=6", "eai-sparsify>=1.1", "transformer-lens>=2"],
    },
    entry_points={"console_scripts": ["gradsae = gradsae.cli:main"]},
)
