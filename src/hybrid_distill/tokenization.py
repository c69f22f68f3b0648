"""Train small byte-level BPE tokenizers (for the shipped teacher and for tests; no downloads)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a Hugging Face fast tokenizer.

    Byte-level means every string is encodable; BOS is prepended when `add_special_tokens=True`.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )


def _tiny_training_text() -> list[str]:
    import random

    rng = random.Random(0)
    words = (
        "the a of and to in is was for on that with as by at from it this be are or an have not which one "
        "special magic number key value grass green sky blue sun yellow here we go there back again what all "
        "hidden within following text make sure memorize quiz about afterwards mentioned provided variable "
        "assigned find common words list most frequent answer memory dictionary"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + "." for _ in range(3000)]
    lines += [f"VAR {''.join(rng.choice('ABCDEFGHIJKLMNOPQRSTUVWXYZ') for _ in range(5))} = {rng.randint(0, 99999)}" for _ in range(500)]
    lines += [" ".join(str(rng.randint(0, 9999999)) for _ in range(8)) for _ in range(500)]
    return lines


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A deterministic small tokenizer for tests (trained in about a second)."""
    return train_tokenizer(_tiny_training_text(), vocab_size=vocab_size)
