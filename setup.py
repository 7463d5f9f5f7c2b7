"""llama-jax: the LLaMA family in JAX/Flax NNX — train, convert, decode."""

import setuptools

setuptools.setup(
    name="llama_jax",
    version="0.1.0",
    description="LLaMA 1/2/3.x in JAX + Flax NNX: pretraining, conversion, decoding.",
    packages=setuptools.find_packages(include=["llama_jax", "llama_jax.*"]),
    # The cpu backend's C++ sources, compiled on first use (llama_jax/backends/cpu/kernels.py).
    package_data={"llama_jax": ["backends/cpu/csrc/*.cc", "backends/cpu/csrc/*.h"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "array-record",
        "sentencepiece",
        "tiktoken",
        "ml-collections",
        "absl-py",
        "numpy",
        "ml_dtypes",
        # TensorBoard event files without TensorFlow (flax.metrics.tensorboard needs TF).
        "tensorboardX",
        # Progress bars of long command-line work (tools/convert_checkpoint.py; TFDS's own).
        "tqdm",
    ],
    extras_require={
        # Reference implementations the tests compare against. torch is pinned to the CPU
        # build; installing it first (see .ci/run) keeps pip from pulling a CUDA wheel.
        "test": [
            "pytest",
            "torch==2.13.0",
            "transformers",
            "safetensors",
            "llama-models",
            "fairscale",
            "fastapi",  # tests/test_serve.py runs the server (the serve extra)
            "uvicorn",  # tests/test_serve.py runs the server (the serve extra)
            "openai",  # tests/test_serve.py talks to the server as API clients do
            "httpx",  # tests/test_serve.py: malformed bodies the openai client cannot send
            # tests/test_lm_eval_model.py: our backend against lm_eval's own hf backend.
            "lm-eval",
            # tests/test_needle.py: tools/needle.py's heat map; the notebooks' plots.
            "matplotlib",
            "nbclient",  # tests/test_notebooks.py executes notebooks/*.ipynb top to bottom
            "nbformat",  # ... reads them and checks they are committed without outputs
            "ipykernel",  # ... in a kernel of the test's own interpreter
            "peft",  # tests/test_lora.py: PEFT loads our adapter export onto the HF model
        ],
        # experiments/serve.py: the OpenAI-compatible HTTP API (llama_jax/serve/api.py) on a
        # well-kept ASGI stack rather than a hand-written HTTP server.
        "serve": ["fastapi", "uvicorn"],
        # tools/lm_eval.py and llama_jax.lm_eval_model: the harness whose model interface the
        # llama_jax backend implements (lm_eval 0.4's LM/TemplateLM, register_model).
        # tools/needle.py draws its heat map with matplotlib.
        "eval": ["lm-eval", "matplotlib"],
        "convert": ["torch==2.13.0"],
        # Ahead-of-time compilation for TPU topologies on any machine (tools/plan.py): libtpu,
        # pinned by jax to the matching release. Only here: on a host without a TPU it is dead
        # weight, and tests that plan TPU targets skip without it.
        "plan": ["jax[tpu]"],
    },
)
