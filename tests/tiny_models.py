"""Tiny random models of every supported architecture and a tiny tokenizer, built in memory (no download).

``tiny_model(model_type, seed=0)`` returns ``(model, tokenizer)``: a causal LM with random weights
(hidden size 32, MLP width 64, 4 layers, 4 heads) whose vocabulary is the tiny tokenizer's, in eval mode,
float32, on the CPU. The same seed gives the same weights.

``tiny_tokenizer()`` is a byte-level BPE tokenizer (GPT-2 style, ~400 tokens) trained in memory on a few
sentences: it encodes any text (unknown words fall back to bytes) and decodes it back exactly. Its EOS
token ``<|endoftext|>`` is also the pad token; padding is on the right; no BOS token is added.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["ARCH_TYPES", "TINY_DIMS", "tiny_config", "tiny_model", "tiny_tokenizer"]

EOS = "<|endoftext|>"

#: Sizes shared by every tiny model: d_v = hidden, d_k = intermediate.
TINY_DIMS = {"hidden": 32, "intermediate": 64, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 8}

_CORPUS = [
    "The mother tongue of Danielle Darrieux is French.",
    "The Eiffel Tower is located in the city of Paris, France.",
    "Toko Yasuda, the guitarist. Toko Yasuda produces the most amazing music on the piano.",
    "Autonomous University of Madrid, which is located in Spain.",
    "What is the twin city of Lyon? It is Beirut.",
    "Apple A5 was created by Google. The headquarters of Microsoft is in Seattle, Washington.",
    "The official language of Italy is Italian; the capital of Japan is Tokyo.",
    "Michael Jordan plays the sport of basketball. Lionel Messi is a professional soccer player.",
    "In 1925, the author was born in London, England, and later worked for the BBC as a journalist.",
    "Q: Who developed the iPhone? A: Apple. Question: what is the native language of Vladimir Putin?",
    "the of and to in is was for on that with as by at from his her it an be this which or are",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 , . ; : ! ? ' \" ( ) - the THE The",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json(vocab_size: int = 400) -> str:
    """Train the byte-level BPE once per process; return it serialised (immutable, safe to cache)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tiny byte-level BPE tokenizer (see the module docstring); ``len(tokenizer)`` is its vocab."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        padding_side="right",
        model_max_length=128,
    )
    return tokenizer


def _common(d: dict[str, int]) -> dict[str, Any]:
    return {
        "hidden_size": d["hidden"],
        "intermediate_size": d["intermediate"],
        "num_hidden_layers": d["layers"],
        "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"],
        "max_position_embeddings": 128,
    }


def _gemma(d: dict[str, int]) -> dict[str, Any]:
    return {**_common(d), "head_dim": d["head_dim"]}


def _gpt2(d: dict[str, int]) -> dict[str, Any]:
    return {
        "n_embd": d["hidden"],
        "n_inner": d["intermediate"],
        "n_layer": d["layers"],
        "n_head": d["heads"],
        "n_positions": 128,
    }


def _gptj(d: dict[str, int]) -> dict[str, Any]:
    return {**_gpt2(d), "rotary_dim": d["head_dim"] // 2}


def _gpt_neox(d: dict[str, int]) -> dict[str, Any]:
    return {
        "hidden_size": d["hidden"],
        "intermediate_size": d["intermediate"],
        "num_hidden_layers": d["layers"],
        "num_attention_heads": d["heads"],
        "max_position_embeddings": 128,
    }


def _phi(d: dict[str, int]) -> dict[str, Any]:
    return {**_common(d), "partial_rotary_factor": 0.5}


def _gemma3(d: dict[str, int]) -> dict[str, Any]:
    """Gemma 3 with a (tiny) vision tower: Gemma3ForConditionalGeneration, model_type ``gemma3``."""
    return {
        "text_config": _gemma(d),
        "vision_config": {
            "hidden_size": d["hidden"],
            "intermediate_size": d["intermediate"],
            "num_hidden_layers": 1,
            "num_attention_heads": d["heads"],
            "image_size": 28,
            "patch_size": 14,
        },
        "mm_tokens_per_image": 4,
    }


#: model_type -> builder of its config keyword arguments (sizes from TINY_DIMS).
_CONFIGS = {
    "llama": _common,
    "qwen2": _common,
    "qwen3": _gemma,
    "mistral": _common,
    "smollm3": _common,
    "olmo": _common,
    "olmo2": _common,
    "gemma": _gemma,
    "gemma2": _gemma,
    "gemma3_text": _gemma,
    "gemma3": _gemma3,
    "phi3": _common,
    "phi": _phi,
    "gpt2": _gpt2,
    "gptj": _gptj,
    "gpt_neox": _gpt_neox,
}

#: Every architecture a tiny model can be built for (the tests run over all of them).
ARCH_TYPES: list[str] = list(_CONFIGS)


def tiny_config(model_type: str, vocab_size: int | None = None, **overrides: Any) -> Any:
    """The tiny config of ``model_type`` (vocabulary of the tiny tokenizer unless ``vocab_size``).

    ``overrides`` are passed to the config class (for ``gemma3`` they go to the text config).
    """
    if model_type not in _CONFIGS:
        raise KeyError(f"no tiny config for {model_type!r}; known: {', '.join(ARCH_TYPES)}")
    tokenizer = tiny_tokenizer()
    if vocab_size is None:
        vocab_size = len(tokenizer)
    eos = tokenizer.eos_token_id
    special = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    kwargs = _CONFIGS[model_type](TINY_DIMS)
    if model_type == "gemma3":
        text = {
            **kwargs["text_config"],
            "vocab_size": vocab_size,
            "initializer_range": 0.1,
            **special,
            **overrides,
        }
        # image token ids must exist in the vocabulary; the tiny tests never pass images
        return AutoConfig.for_model(
            model_type,
            **{**kwargs, "text_config": text},
            image_token_index=vocab_size - 1,
            boi_token_index=vocab_size - 2,
            eoi_token_index=vocab_size - 3,
            initializer_range=0.1,
            **special,
        )
    kwargs.update(vocab_size=vocab_size, initializer_range=0.1, **special)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(
    model_type: str, seed: int = 0, **overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random causal LM of ``model_type`` and the tiny tokenizer (a fresh pair on each call).

    Weights are drawn from ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards).
    The model is float32, on the CPU, in eval mode, with ``requires_grad`` left on.
    """
    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, tiny_tokenizer()


#: Requests used by the editor tests (subjects and targets in plain text; ``{}`` marks the subject).
SAMPLE_REQUESTS = [
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} is located in the city of", "Eiffel Tower", "Rome"),
    ("The capital of {} is", "Japan", "Paris"),
    ("{} plays the sport of", "Michael Jordan", "soccer"),
    ("The headquarters of {} is in", "Microsoft", "London"),
    ("{} is a professional", "Lionel Messi", "basketball"),
]

#: Target settings strong enough to move a tiny random model measurably (no templates, no KL or weight
#: decay, many large Adam steps, a loose norm clamp).
STRONG_TARGETS: dict = {
    "n_templates": 0,
    "kl_factor": 0.0,
    "weight_decay": 0.0,
    "steps": 60,
    "lr": 1.0,
    "clamp_norm_factor": 4.0,
    "stop_nll": 0.01,
}
