"""The system lane's training tests share the training fixtures (tests/training/conftest.py)."""
from tests.training.conftest import smollm2_path, tiny_llama, tok  # noqa: F401  (fixtures)
