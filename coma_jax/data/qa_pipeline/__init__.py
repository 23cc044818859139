"""Stage-1 data generation: sample images, ask questions, answer them turn by turn (`coma_jax.datagen`)."""
