"""A short ``rl-train`` job with the vLLM engine, run in its own process by test_vllm.py.

Its own process because vLLM changes the process that starts it (environment variables; in
process mode also ``torch.set_num_threads`` and the global RNG), which must not leak into the
rest of the suite. Prints one JSON line: the metrics records and what each step's hook saw.
"""

from __future__ import annotations

import json
import sys


def main(dump_folder: str, *overrides: str) -> None:
    from rl.loop import run
    from tests.rl.rl_cases import load

    cfg = load(dump_folder, *overrides, steps=3)
    seen = []

    def on_step(record, trainer, generator):
        from checkpointing.vllm.worker import model_census

        trainer_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        seen.append({
            "loaded_step": generator.checkpointer.loaded_step,
            "vllm_version": generator.engine.llm.get_weight_version(),
            "this_process": model_census(),
            "trainer_bytes": trainer_bytes,
            "worker": generator.checkpointer.model_census(),
            "engine_modules": sorted(k for k, v in vars(generator.engine).items() if hasattr(v, "parameters")),
        })

    summary = run(cfg, on_step=on_step)
    records = [json.loads(line) for line in open(summary.metrics_path)]
    print("RESULT " + json.dumps({"records": records, "seen": seen}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
