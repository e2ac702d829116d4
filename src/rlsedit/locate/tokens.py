"""Tokenising edit prompts while tracking the subject's last token.

A prompt row is ``context + request.prefix + subject + request.suffix`` (+ target tokens when scoring).
The subject's last token is found from the tokenizer's character offsets when it provides them (fast
tokenizers), otherwise from the length of the tokenised text up to the end of the subject.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlsedit.requests import EditRequest

__all__ = ["EncodedBatch", "encode_prompts", "encode_text_upto", "target_ids"]


def _subject_last_index(tokenizer, text: str, subject_end: int) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the token holding character ``subject_end - 1``."""
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets = None
        enc = tokenizer(text, add_special_tokens=True)
    ids = list(enc["input_ids"])
    if offsets is not None:
        last = None
        for i, (start, end) in enumerate(offsets):
            if end > start and start < subject_end:
                last = i
        if last is not None:
            return ids, last
    # Fallback: the tokens of the text up to the subject's end.
    prefix_ids = tokenizer(text[:subject_end], add_special_tokens=True)["input_ids"]
    return ids, max(0, min(len(prefix_ids), len(ids)) - 1)


def encode_text_upto(tokenizer, text: str, subject_end: int) -> tuple[list[int], int]:
    """Public wrapper: ``(ids, index of the subject's last token)`` for ``text``."""
    return _subject_last_index(tokenizer, text, subject_end)


def target_ids(tokenizer, target_text: str) -> list[int]:
    """Token ids of a target continuation (already holding its leading space), no special tokens."""
    ids = list(tokenizer(target_text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target_text!r} tokenises to nothing")
    return ids


@dataclass
class EncodedBatch:
    """A right-padded batch of prompt rows.

    Attributes:
        input_ids: ``(n, T)`` token ids (padding with the tokenizer's pad id).
        attention_mask: ``(n, T)`` 1 for real tokens.
        subject_last: ``(n,)`` index of the subject's last token in each row.
        lengths: ``(n,)`` number of real tokens per row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_last: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.subject_last.to(device),
            self.lengths.to(device),
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into ``(ids, mask)`` tensors of shape ``(n, max_len)``."""
    n = len(rows)
    width = max(len(r) for r in rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad)


def encode_prompts(
    tokenizer,
    requests: Sequence[EditRequest],
    contexts: Sequence[str] = ("",),
    suffix_ids: Sequence[Sequence[int]] | None = None,
) -> EncodedBatch:
    """Encode every (request, context) pair, request-major: row ``i * len(contexts) + j``.

    Args:
        requests: the edit requests.
        contexts: text prepended to each request's filled prompt (``""`` for the bare prompt).
        suffix_ids: optional per-request token ids appended after the prompt (e.g. target tokens).
    """
    rows: list[list[int]] = []
    last: list[int] = []
    for i, req in enumerate(requests):
        for ctx in contexts:
            text = ctx + req.text
            subject_end = len(ctx) + len(req.prefix) + len(req.subject)
            ids, idx = _subject_last_index(tokenizer, text, subject_end)
            if suffix_ids is not None:
                ids = ids + list(suffix_ids[i])
            rows.append(ids)
            last.append(idx)
    ids_t, mask = pad_rows(rows, pad_id_of(tokenizer))
    return EncodedBatch(ids_t, mask, torch.tensor(last, dtype=torch.long), mask.sum(1))
