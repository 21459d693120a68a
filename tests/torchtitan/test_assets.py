"""The llama3 debug run's shipped assets: generated here (no third-party text), reproducible byte
for byte, small, and what TorchTitan's tokenizer and model expect."""

from __future__ import annotations

import importlib.util
import json

from tests.torchtitan.runs import REPO

ASSETS = REPO / "src" / "checkpointing" / "assets" / "llama3_debug"
FILES = ("data/train.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")


def test_generator_reproduces_the_committed_files(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_llama3_debug", ASSETS / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.main(str(tmp_path))
    for rel in FILES:
        assert (tmp_path / rel).read_bytes() == (ASSETS / rel).read_bytes(), f"{rel} differs from what generate.py writes"


def test_data_is_small_and_the_tokenizer_fits_the_debug_model():
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.models.llama3 import llama3_args

    data = ASSETS / "data" / "train.jsonl"
    assert data.stat().st_size < 300 << 10
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    assert len(texts) >= 500 and all(texts)
    tok = HuggingFaceTokenizer(str(ASSETS / "tokenizer"))
    assert tok.bos_id is not None and tok.eos_id is not None
    assert tok.get_vocab_size() <= llama3_args["debugmodel"].vocab_size
    ids = tok.encode(texts[0], add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == texts[0]
