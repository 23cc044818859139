"""Meshes, logical-axis rules and shardings."""
