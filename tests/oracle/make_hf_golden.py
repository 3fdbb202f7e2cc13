"""Make tests/fixtures/hf_golden/: tiny random models run by HF transformers itself.

Runs only in a separate venv with torch and transformers (the project and its CI never need torch):

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/hfvenv/bin/python tests/oracle/make_hf_golden.py

For each fixture it builds a model with the transformers class, gives it random weights at a sensible
scale (HF's default init of std 0.02 would make every logit nearly 0 and argmax arbitrary), saves it
with save_pretrained, reloads it from disk, and records in <name>/:
- expected.json: input_ids (20 tokens); greedy_ids, 8 tokens appended by greedy decoding where each
  step is a full forward without cache (the oracle's definition); hf_generate_ids, what
  model.generate (greedy, with its KV cache) appends, and the largest difference of its step logits
  from a full recompute; the smallest top-1 margin of the greedy steps.
- logits.npy: float32 [20, vocab] logits of every input position, from one forward without cache.
"""

import json
import sys
from pathlib import Path

import numpy as np

try:
    import torch
    import transformers
except ImportError:  # the project's own environment, which never needs torch
    torch = transformers = None

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "hf_golden"
PROMPT_LENGTH = 20
NEW_TOKENS = 8
# A fixture is kept only if its greedy run is robust (every step's top-1 beats the runner-up by this much,
# far above float32 noise) and not degenerate (at least this many distinct new tokens); otherwise the
# next seed is tried.
MIN_GREEDY_MARGIN = 0.01
MIN_DISTINCT_NEW_TOKENS = 4
SEED_ATTEMPTS = 20

# name -> (model class, config kwargs, dtype the weights are saved in, max_shard_size or None,
#          edits applied to the saved config.json, what the fixture tests)
FIXTURES = {
    "llama_gqa_llama3": (
        "LlamaForCausalLM",
        dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
        "float32", None, {},
        "GQA 2:1, llama3 rope: head_dim 16 has wavelengths in all three bands (kept < 32 < smoothed < 128 < divided)",
    ),
    "llama_linear_tied_fp16": (
        "LlamaForCausalLM",
        dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
             tie_word_embeddings=True, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        "float16", None, {},
        "MHA, tied embeddings, linear rope factor 4, weights stored as F16",
    ),
    "llama_dynamic_ntk_sharded": (
        "LlamaForCausalLM",
        dict(vocab_size=80, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=12, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0}),
        "float32", "40KB", {},
        "dynamic NTK rope with max_position_embeddings 12 < 20 prompt tokens, so the base grows; saved in 3 shards",
    ),
    "mistral_sliding_window": (
        "MistralForCausalLM",
        dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             sliding_window=5, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=1000.0),
        "float32", None, {},
        "sliding_window 5 < 20 prompt tokens (query i sees keys i-4..i), GQA 2:1, rope_theta 1000",
    ),
    "qwen2_bias_tied_bf16": (
        "Qwen2ForCausalLM",
        dict(vocab_size=112, hidden_size=32, intermediate_size=80, num_attention_heads=4, num_key_value_heads=1,
             tie_word_embeddings=True, max_position_embeddings=256, rms_norm_eps=1e-6),
        "bfloat16", None,
        # As in Qwen2.5 checkpoints: a sliding_window that does nothing because use_sliding_window is false.
        {"sliding_window": 4, "use_sliding_window": False, "max_window_layers": 0},
        "Qwen2 (q/k/v bias, no o bias), MQA, tied, weights stored as BF16; sliding_window 4 ignored (use_sliding_window false)",
    ),
    "qwen2_sliding_layers": (
        "Qwen2ForCausalLM",
        dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             use_sliding_window=True, sliding_window=6, max_window_layers=1, max_position_embeddings=256,
             rms_norm_eps=1e-6),
        "float32", None, {},
        "Qwen2 with use_sliding_window: layer 0 full attention, layer 1 sliding window 6",
    ),
    "llama_mha_head_dim_bias": (
        "LlamaForCausalLM",
        dict(vocab_size=72, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4,
             head_dim=12, attention_bias=True, mlp_bias=True, max_position_embeddings=256, rms_norm_eps=0.05),
        "float32", None, {},
        "untied MHA, head_dim 12 != 32/4, attention_bias (q/k/v/o) and mlp_bias, rms_norm_eps 0.05 (large, so its place matters)",
    ),
    "llama_mqa_legacy_rope_scaling": (
        "LlamaForCausalLM",
        dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_attention_heads=8, num_key_value_heads=1,
             max_position_embeddings=256, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "linear", "rope_theta": 100.0, "factor": 2.0}),
        "float32", None,
        # Rewritten in transformers 4 spelling: rope_scaling with "type", rope_theta at top level.
        {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 100.0},
        "MQA (8 query heads, 1 kv head), rope_theta 100, linear rope written the transformers-4 way",
    ),
}


def main() -> None:
    if torch is None:
        sys.exit("make_hf_golden.py needs torch and transformers; see its docstring for the venv to run it in")

    FIXTURES_DIR.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for number, (name, spec) in enumerate(FIXTURES.items()):
        directory = FIXTURES_DIR / name
        for attempt in range(SEED_ATTEMPTS):
            for old in directory.glob("*"):
                old.unlink()
            if make_fixture(directory, 100 * attempt + number, *spec):
                break
        else:
            raise RuntimeError(f"{name}: no seed in {SEED_ATTEMPTS} attempts gave a robust, varied greedy run")
        sizes[name] = sum(f.stat().st_size for f in directory.iterdir())
        print(f"{name}: {sizes[name] / 1024:.0f} KiB")
    write_readme(sizes)


def make_fixture(directory, seed, class_name, config_kwargs, save_dtype, max_shard_size, config_edits,
                 description) -> bool:
    """Build, save and run one fixture; False if its greedy run is fragile or degenerate."""
    model_class = getattr(transformers, class_name)
    config = model_class.config_class(num_hidden_layers=2, bos_token_id=1, eos_token_id=2, **config_kwargs)
    torch.manual_seed(seed)
    model = model_class(config)
    randomize(model)
    # Round the weights to the storage dtype before saving; the float32 model reloaded below then holds
    # exactly the stored values.
    model.to(getattr(torch, save_dtype))
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **save_kwargs)
    (directory / "generation_config.json").unlink()

    config_file = directory / "config.json"
    config_json = json.loads(config_file.read_text())
    for key, value in config_edits.items():
        if value is None:
            config_json.pop(key, None)
        else:
            config_json[key] = value
    config_file.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")

    def load():
        # A fresh model for each run: HF's dynamic-NTK rotary embedding keeps state between calls.
        loaded = model_class.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
        loaded.eval()
        return loaded

    generator = torch.Generator().manual_seed(1000 + seed)
    input_ids = torch.randint(3, config.vocab_size, (1, PROMPT_LENGTH), generator=generator)

    with torch.no_grad():
        logits = load()(input_ids, use_cache=False).logits[0].numpy()

        greedy_model = load()
        ids = input_ids
        margins = []
        for _ in range(NEW_TOKENS):
            last = greedy_model(ids, use_cache=False).logits[0, -1]
            top2 = torch.topk(last, 2).values
            margins.append(float(top2[0] - top2[1]))
            ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
        greedy_ids = ids[0, PROMPT_LENGTH:].tolist()

        generate_model = load()
        generate_model.generation_config.eos_token_id = None  # never stop early
        generated = generate_model.generate(
            input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
            return_dict_in_generate=True, output_logits=True,
        )
        hf_generate_ids = generated.sequences[0, PROMPT_LENGTH:].tolist()
        # How far decoding with HF's KV cache strays from the full recompute (same tokens fed to both).
        recomputed = load()(generated.sequences, use_cache=False).logits[0, PROMPT_LENGTH - 1 : -1]
        cached = torch.cat(generated.logits, dim=0)
        cache_vs_recompute = float((cached - recomputed).abs().max())

    if min(margins) < MIN_GREEDY_MARGIN or len(set(greedy_ids)) < MIN_DISTINCT_NEW_TOKENS:
        return False
    np.save(directory / "logits.npy", logits.astype(np.float32))
    expected = {
        "model_class": class_name,
        "seed": seed,
        "description": description,
        "input_ids": input_ids[0].tolist(),
        "greedy_ids": greedy_ids,
        "hf_generate_ids": hf_generate_ids,
        "hf_generate_max_logit_diff_vs_recompute": float(f"{cache_vs_recompute:.3g}"),
        "min_greedy_margin": round(min(margins), 4),
    }
    (directory / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return True


def randomize(model) -> None:
    """Weights at the scale tests/oracle/tiny_models.py uses (see random_tensor there for why): logits
    O(1)-O(10), attention not flat, greedy decoding not stuck on one token."""
    hidden_size = model.config.hidden_size
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name == "model.embed_tokens.weight":
                parameter.normal_(0.0, 0.5)
            elif name == "model.norm.weight":
                parameter.normal_(0.0, 1.0)
            elif name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.3)
            elif name == "lm_head.weight":
                parameter.normal_(0.0, 3.0 / hidden_size**0.5)
            else:
                parameter.normal_(0.0, 1.0 / parameter.shape[1] ** 0.5)


def write_readme(sizes) -> None:
    lines = [
        "# HF golden fixtures",
        "",
        "Tiny random models run by HF transformers itself; tests/test_oracle.py checks that the NumPy oracle",
        "(tests/oracle/llama_numpy.py) reproduces them. Made by `tests/oracle/make_hf_golden.py` (read it for",
        "the exact configs) with:",
        "",
        f"- transformers {transformers.__version__}",
        f"- torch {torch.__version__}",
        "",
        "CPU, float32, eager attention, batch 1. Each folder holds the saved model (config.json + safetensors),",
        "`expected.json` (input_ids, greedy_ids from full recomputes, hf_generate_ids from model.generate with",
        "its KV cache and how far its logits stray from the recompute, min_greedy_margin) and `logits.npy`",
        "(float32 logits of every input position).",
        "",
        "| fixture | bytes | what it tests |",
        "| --- | --- | --- |",
    ]
    for name, spec in FIXTURES.items():
        lines.append(f"| {name} | {sizes[name]} | {spec[5]} |")
    (FIXTURES_DIR / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
