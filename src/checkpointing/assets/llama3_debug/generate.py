"""Rebuild the llama3 debug run's assets: a small text data set and a BPE tokenizer trained on it.

``titan-train --job.config_file configs/titan_llama3_debug.toml`` needs TorchTitan's test
tokenizer and ``c4_test`` data, which live in TorchTitan's repository, not in its wheel, and
nothing may be downloaded at run time. So both are made here, from text this script writes
itself (templated short stories from word lists below: no third-party text, no license
questions), and committed beside it:

    data/train.jsonl     {"text": ...} per line, what ``training.dataset_path`` points at
    tokenizer/           tokenizer.json + tokenizer_config.json (``model.hf_assets_path``)

The output is deterministic; ``tests/torchtitan/test_assets.py`` checks that running this again
reproduces the committed files byte for byte.

    python src/checkpointing/assets/llama3_debug/generate.py [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import random
import sys

SEED = 0
STORIES = 800
VOCAB_SIZE = 2000  # below the llama3 debugmodel's 2048 embedding rows
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

NAMES = ["Ada", "Ben", "Cora", "Dev", "Ena", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kira", "Leo",
         "Mina", "Nico", "Oda", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vik", "Wren", "Yara"]
ANIMALS = ["cat", "dog", "fox", "owl", "goat", "duck", "frog", "bear", "hen", "mouse", "horse", "crow"]
PLACES = ["the old mill", "the river bank", "the market", "the hill", "the garden", "the harbor",
          "the library", "the forest", "the bakery", "the station", "the quiet lake", "the school yard"]
OBJECTS = ["a red kite", "a blue lamp", "a small boat", "a brass key", "a wooden box", "a paper map",
           "a silver bell", "a green scarf", "a clay pot", "a long rope", "a warm loaf", "a tin whistle"]
ADJECTIVES = ["happy", "tired", "curious", "brave", "quiet", "busy", "clever", "gentle", "lucky", "proud"]
WEATHER = ["The sun was bright", "Rain fell softly", "A cold wind blew", "Snow covered the roofs",
           "Fog hid the valley", "The sky was clear"]
TIMES = ["In the morning", "At noon", "Late in the evening", "One autumn day", "Before dinner",
         "After the storm", "On a Sunday", "At first light"]
VERBS = ["found", "lost", "carried", "painted", "fixed", "shared", "hid", "sold", "gave away", "built"]
FEELINGS = ["laughed", "smiled", "sighed", "sang a song", "clapped", "waved", "nodded", "cheered"]
COUNTS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def sentence(rng: random.Random, hero: str, friend: str, pet: str) -> str:
    forms = [
        lambda: f"{rng.choice(TIMES)}, {hero} walked to {rng.choice(PLACES)} with the {pet}.",
        lambda: f"{rng.choice(WEATHER)}, and {friend} felt {rng.choice(ADJECTIVES)}.",
        lambda: f"{hero} {rng.choice(VERBS)} {rng.choice(OBJECTS)} near {rng.choice(PLACES)}.",
        lambda: f"The {pet} was {rng.choice(ADJECTIVES)} and {rng.choice(FEELINGS)}.",
        lambda: f"\"Look at this,\" said {friend}, holding {rng.choice(OBJECTS)}.",
        lambda: f"They counted {rng.choice(COUNTS)} birds and {rng.choice(COUNTS)} boats.",
        lambda: f"{friend} asked {hero} why the {pet} {rng.choice(FEELINGS)}.",
        lambda: f"At the end of the day, {hero} and {friend} went home to {rng.choice(PLACES)}.",
    ]
    return rng.choice(forms)()


def stories(seed: int = SEED, count: int = STORIES) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        hero, friend = rng.sample(NAMES, 2)
        pet = rng.choice(ANIMALS)
        lines = [f"{hero} had a {rng.choice(ADJECTIVES)} {pet}."]
        lines += [sentence(rng, hero, friend, pet) for _ in range(rng.randint(3, 7))]
        out.append(" ".join(lines))
    return out


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main(out_dir: str) -> None:
    texts = stories()
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "tokenizer"), exist_ok=True)
    with open(os.path.join(out_dir, "data", "train.jsonl"), "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    build_tokenizer(texts).save(os.path.join(out_dir, "tokenizer", "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": True,
              "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(out_dir, "tokenizer", "tokenizer_config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
