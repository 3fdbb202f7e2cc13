"""Make tests/fixtures/perplexity.json: transformers' perplexity of the eval text over sliding windows.

Runs only in a separate venv with torch and transformers (the project and its CI never need torch):

    minitorch-infer convert models/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-hf     # (project venv)
    /tmp/hfvenv/bin/python tests/oracle/make_perplexity_fixture.py models/story /tmp/smollm2-hf

For each model it tokenizes the start of minitorch_infer/data/eval.txt with transformers' tokenizer, and
scores it the way transformers' perplexity guide does: windows of `context` tokens, `stride` apart, the
tokens no earlier window scored labelled and the rest masked with -100, the summed cross-entropy over all
labelled tokens divided by their count. The test (tests/test_eval.py) runs `evaluate` on the same ids.
"""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "minitorch_infer" / "data" / "eval.txt"
FIXTURE = ROOT / "tests" / "fixtures" / "perplexity.json"
SETTINGS = {"story": {"tokens": 700, "context": 256, "stride": 128},
            "smollm2-135m-instruct": {"tokens": 400, "context": 256, "stride": 96}}


def transformers_perplexity(model, ids: list[int], context: int, stride: int) -> float:
    import torch

    total, count, scored_to = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, :max(scored_to - begin, 0)] = -100          # scored by an earlier window
        with torch.no_grad():
            logits = model(window).logits.float()
        # position j predicts token j + 1
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels[0, 1:] != -100).sum())
        scored_to = end
        if end == len(ids):
            break
    return math.exp(total / count)


def main(story_dir: str, smollm2_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    text = TEXT.read_text(encoding="utf-8")
    fixture = {}
    for name, folder in (("story", story_dir), ("smollm2-135m-instruct", smollm2_dir)):
        settings = SETTINGS[name]
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = tokenizer(text)["input_ids"][:settings["tokens"]]
        fixture[name] = {**settings, "ids": ids,
                         "perplexity": transformers_perplexity(model, ids, settings["context"], settings["stride"]),
                         "transformers": __import__("transformers").__version__}
        print(name, fixture[name]["perplexity"])
    FIXTURE.write_text(json.dumps(fixture) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
