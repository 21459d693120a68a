"""The shipped character-level tokenizer (``assets/tokenizer.json``, Hugging Face ``tokenizers``
format): no download, and a file transformers / vLLM can read beside an exported model.

One token per character keeps rewards exact (a digit is a token) and the vocabulary tiny, so a
small TorchTitan flavor learns the toy tasks in minutes. :func:`build_tokenizer` is the source of
truth for the JSON; a test checks the committed file matches it.
"""

from __future__ import annotations

import functools
import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torchtitan.components.tokenizer import BaseTokenizer

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
CHARACTERS = "0123456789>=+| abcdefghijklmnopqrstuvwxyz"
ASSET = os.path.join(os.path.dirname(__file__), "assets", "tokenizer.json")


def build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *CHARACTERS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return tok


class CharTokenizer(BaseTokenizer):
    """TorchTitan's tokenizer protocol over the shipped JSON, with fixed special ids."""

    def __init__(self, path: str = ASSET):
        super().__init__()
        self.path = path
        self._tok = Tokenizer.from_file(path)
        self.pad_id = self._id(PAD)
        self.bos_id = self._id(BOS)
        self.eos_id = self._id(EOS)
        self.unk_id = self._id(UNK)

    def _id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"tokenizer {self.path} has no {token} token")
        return idx

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_until_eos(self, ids) -> tuple[str, bool]:
        """The text before the first EOS, and whether an EOS was produced at all."""
        ids = list(ids)
        ended = self.eos_id in ids
        if ended:
            ids = ids[: ids.index(self.eos_id)]
        return self._tok.decode([i for i in ids if i != self.pad_id], skip_special_tokens=False), ended

    def get_vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


@functools.cache
def load_tokenizer(path: str = ASSET) -> CharTokenizer:
    return CharTokenizer(path)


if __name__ == "__main__":  # regenerate the shipped asset: python -m rl.tokenizer
    build_tokenizer().save(ASSET, pretty=True)
    print(f"wrote {ASSET}")
