"""Shared fixtures: the trained model in ../shared/models (skipped without it)."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"


@pytest.fixture(scope="session")
def shared_models():
    if not (SHARED / "tinystories-moe-f16.gguf").exists():
        pytest.skip("the trained model in ../shared/models is not here")
    return SHARED


def valid_stories(shared, n):
    """The first n stories of valid.txt, as the models README defines them."""
    text = (shared / "valid.txt").read_text(encoding="utf-8")
    stories = [s.strip("\n") for s in text.split("<|endoftext|>")]
    return [s for s in stories if s.strip()][:n]
