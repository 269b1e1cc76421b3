"""Small things several test modules build: word-level text and its tokenizer, and loaders whose
passes differ (the hand-written loader bugs the run must catch).

Plain functions, not fixtures, so each module keeps its own vocabulary and sizes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def random_sentences(words: Sequence[str], n: int, seed: int = 0, longest: int = 12) -> list[str]:
    """``n`` sentences of 4 to ``longest - 1`` words drawn from ``words``, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(torch.randint(4, longest, (1,), generator=g)),),
                                                          generator=g)) for _ in range(n)]


def word_tokenizer(words: Sequence[str], **special: str):
    """A whitespace, word-level fast tokenizer: ids 0-4 are ``SPECIAL_TOKENS``, then ``words``
    (``special`` adds tokens such as ``eos_token="[SEP]"``)."""
    import tokenizers
    import transformers

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + list(words))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", **special)


class ScriptedLoader:
    """Says ``len(batches)`` batches, but pass k (from 1) yields ``per_pass(k, batches)``."""

    def __init__(self, batches: list, per_pass: Callable[[int, list], list]):
        self.batches, self.per_pass, self.passes = batches, per_pass, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        return iter(self.per_pass(self.passes, self.batches))
