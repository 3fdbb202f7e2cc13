"""Make tests/fixtures/extensions/: a tiny GPT-2 and a tiny Mixtral, saved and run by HF transformers itself,
for the architectures in examples/architectures/ (written with the public extension API only).

Runs only in a separate venv with torch and transformers (the project and its CI never need torch):

    python3 -m venv .venv-torch
    .venv-torch/bin/pip install torch==2.13.0 transformers safetensors numpy
    .venv-torch/bin/python tests/oracle/make_extension_golden.py

Each folder holds what save_pretrained writes (config.json, model.safetensors), a byte-level tokenizer
(tokenizer.json: the 256 bytes, then <s> = 256 and </s> = 257) and, as make_hf_golden.py records them,
expected.json (input_ids, greedy_ids from full recomputes, hf_generate_ids from model.generate with its
KV cache, the smallest greedy top-1 margin) and logits.npy (float32 logits of every input position).
Weights get a sensible random scale (see randomize), and a seed is kept only if its greedy run is robust.
"""

import json
import sys
from pathlib import Path

import numpy as np

try:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
except ImportError:  # the project's own environment, which never needs torch
    torch = transformers = None

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "extensions"
VOCAB_SIZE = 258                   # 256 bytes, <s>, </s>
BOS, EOS = 256, 257
PROMPT_LENGTH = 20
NEW_TOKENS = 8
MIN_GREEDY_MARGIN = 0.01
MIN_DISTINCT_NEW_TOKENS = 4
SEED_ATTEMPTS = 20

# name -> (model class, config kwargs, tokenizer adds BOS, what the fixture tests)
FIXTURES = {
    "gpt2_tiny": (
        "GPT2LMHeadModel",
        dict(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=EOS,
             eos_token_id=EOS, activation_function="gelu_new", layer_norm_epsilon=1e-5),
        False,
        "GPT-2: LayerNorm, tanh GELU, learned positions (64), biases, fused c_attn, Conv1D [in, out] weights, "
        "tied head",
    ),
    "mixtral_tiny": (
        "MixtralForCausalLM",
        dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, sliding_window=None),
        True,
        "Mixtral: router, top-2 of 4 SwiGLU experts per token, GQA 2:1",
    ),
}


def main() -> None:
    if torch is None:
        sys.exit("make_extension_golden.py needs torch and transformers; see its docstring for the venv to run it in")
    for number, (name, spec) in enumerate(FIXTURES.items()):
        directory = FIXTURES_DIR / name
        directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(SEED_ATTEMPTS):
            for old in directory.glob("*"):
                old.unlink()
            if make_fixture(directory, 100 * attempt + number, *spec):
                break
        else:
            raise RuntimeError(f"{name}: no seed in {SEED_ATTEMPTS} attempts gave a robust, varied greedy run")
        size = sum(f.stat().st_size for f in directory.iterdir())
        print(f"{name}: {size / 1024:.0f} KiB (transformers {transformers.__version__}, torch {torch.__version__})")


def write_tokenizer(directory: Path, add_bos: bool) -> None:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = {"add_bos_token": add_bos, "bos_token": "<s>", "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=1) + "\n")


def _byte_of(char: str) -> int:
    """GPT-2's byte-to-unicode table, inverted: printable bytes are themselves, the rest start at U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(char) in printable:
        return ord(char)
    others = [b for b in range(256) if b not in printable]
    return others[ord(char) - 256]


def make_fixture(directory, seed, class_name, config_kwargs, add_bos, description) -> bool:
    model_class = getattr(transformers, class_name)
    config = model_class.config_class(**config_kwargs)
    torch.manual_seed(seed)
    model = model_class(config)
    randomize(model)
    model.save_pretrained(directory)
    (directory / "generation_config.json").unlink(missing_ok=True)
    write_tokenizer(directory, add_bos)

    def load():
        loaded = model_class.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
        loaded.eval()
        return loaded

    generator = torch.Generator().manual_seed(1000 + seed)
    input_ids = torch.randint(3, 256, (1, PROMPT_LENGTH), generator=generator)
    with torch.no_grad():
        logits = load()(input_ids, use_cache=False).logits[0].numpy()
        greedy_model = load()
        ids, margins = input_ids, []
        for _ in range(NEW_TOKENS):
            last = greedy_model(ids, use_cache=False).logits[0, -1]
            top2 = torch.topk(last, 2).values
            margins.append(float(top2[0] - top2[1]))
            ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
        greedy_ids = ids[0, PROMPT_LENGTH:].tolist()
        generate_model = load()
        generate_model.generation_config.eos_token_id = None
        generated = generate_model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
        hf_generate_ids = generated[0, PROMPT_LENGTH:].tolist()
    if min(margins) < MIN_GREEDY_MARGIN or len(set(greedy_ids)) < MIN_DISTINCT_NEW_TOKENS:
        return False
    np.save(directory / "logits.npy", logits.astype(np.float32))
    expected = {"model_class": class_name, "seed": seed, "description": description,
                "transformers": transformers.__version__, "torch": torch.__version__,
                "input_ids": input_ids[0].tolist(), "greedy_ids": greedy_ids, "hf_generate_ids": hf_generate_ids,
                "min_greedy_margin": round(min(margins), 4)}
    (directory / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return True


def randomize(model) -> None:
    """Weights at a scale where logits are O(1)-O(10), attention is not flat and routing not a coin toss (HF's
    default init of std 0.02 makes every logit nearly 0). Conv1D weights are [in, out], Linear ones [out, in]."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("embed_tokens.weight", "wte.weight")):
                parameter.normal_(0.0, 0.5)
            elif name.endswith("wpe.weight"):
                parameter.normal_(0.0, 0.2)
            elif name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                # GPT-2 has eight bias vectors a layer, the same for every position: kept small, or together
                # they outweigh the token and greedy decoding repeats one token
                parameter.normal_(0.0, 0.05 if name.startswith("transformer.") else 0.3)
            elif name == "lm_head.weight":
                parameter.normal_(0.0, 3.0 / model.config.hidden_size ** 0.5)
            elif name.endswith("block_sparse_moe.gate.weight"):
                parameter.normal_(0.0, 2.0 / parameter.shape[1] ** 0.5)      # distinct router scores
            elif name.startswith("transformer."):
                # GPT-2's Conv1D, [in, out]; at twice the usual scale the layers outweigh the token's own
                # embedding, which the tied head would otherwise echo back
                parameter.normal_(0.0, 2.0 / parameter.shape[0] ** 0.5)
            else:
                parameter.normal_(0.0, 1.0 / parameter.shape[1] ** 0.5)


if __name__ == "__main__":
    main()
