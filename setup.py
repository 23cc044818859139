from setuptools import find_packages, setup

setup(
    name='coma_jax',
    version='0.1.0',
    description='CoMa (Compressing then Matching) multimodal embeddings on JAX/Flax with Qwen2.5-VL',
    packages=find_packages(include=['coma_jax', 'coma_jax.*']),
    package_data={'coma_jax.model': ['hf_configs/*.json']},
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
        'scikit-image>=0.24,<0.27',  # ships the real photos the demo uses
    ],
    extras_require={
        # torch is only the numerical reference; 2.13.0 is the CPU wheel (a bare `torch` pulls CUDA).
        'demo': [],  # the demo needs only the core; later issues may add to it
        'test': ['torch==2.13.0', 'transformers>=5.24.0,<5.25', 'pytest>=8,<10'],
        'gpu': ['jax[cuda12]>=0.10.2,<0.12'],
        'tpu': ['jax[tpu]>=0.10.2,<0.12'],
    },
)
