"""Shared fixtures: tiny random models of every supported architecture and the tiny tokenizer.

Use them as::

    def test_something(tiny_model_factory):
        model, tokenizer = tiny_model_factory("llama", seed=0)

    @pytest.mark.parametrize("model_type", ARCH_TYPES)     # from tiny_models import ARCH_TYPES
    def test_every_arch(tiny_model_factory, model_type): ...

Every call of the factory builds a fresh model, so tests may edit it in place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerFast

import tiny_models
from tiny_models import ARCH_TYPES

__all__ = ["ARCH_TYPES"]


@pytest.fixture
def tiny_model_factory() -> Callable[..., tuple[PreTrainedModel, PreTrainedTokenizerFast]]:
    """``tiny_model(model_type, seed=0, **config_overrides) -> (model, tokenizer)``."""
    return tiny_models.tiny_model


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tiny byte-level BPE tokenizer (EOS = pad = ``<|endoftext|>``, right padding)."""
    return tiny_models.tiny_tokenizer()


@pytest.fixture(params=ARCH_TYPES)
def tiny_arch_model(request: pytest.FixtureRequest) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny model (seed 0) of each architecture in turn, with the tiny tokenizer."""
    return tiny_models.tiny_model(request.param)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama (seed 3) and its tokenizer saved to a folder, as ``--model`` of the CLI takes it."""
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model, tok = tiny_models.tiny_model("llama", seed=3)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
