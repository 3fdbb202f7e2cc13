"""rope_pairs: q/k rows reordered to adjacent pairs, RoPE as one complex multiply, same attention."""

import numpy as np
import pytest

from minitorch_infer.architectures import build_graph
from minitorch_infer.backends import reference
from minitorch_infer.config import ModelConfig
from minitorch_infer.passes import PassManager
from minitorch_infer.passes.rope_pairs import rope_pairs
from minitorch_infer.weights import WeightStore


def random_weights(graph, rng):
    return {name: (rng.standard_normal(v.type.concrete_shape()) * 0.3).astype(np.float32)
            for name, v in graph.params.items()}


def run(graph, weights, prompt, next_token):
    """Prefill the prompt into an empty cache, then one decode step: both steps' logits."""
    state = {name: np.zeros(v.type.concrete_shape(), np.float32) for name, v in graph.states.items()}
    outputs = []
    for ids, start in ((prompt, 0), ([next_token], len(prompt))):
        inputs = {"tokens": np.array(ids), "positions": np.arange(start, start + len(ids))}
        outputs += reference.run(graph, weights, inputs, state, {"S": len(ids), "T": start + len(ids)})
    return outputs, state


@pytest.mark.parametrize("extra", [{}, {"attention_bias": True}, {"architectures": ["Qwen2ForCausalLM"]},
                                   {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}])
def test_rope_pairs_keeps_logits_and_leaves_one_op_per_rope(extra):
    config = ModelConfig.from_dict({"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40, **extra})
    before = build_graph(config, context=32, prefill_chunk=8)
    rng = np.random.default_rng(0)
    weights = random_weights(before, rng)
    expected_logits, expected_state = run(before, weights, [3, 7, 11], 5)

    store = WeightStore()
    for name, array in weights.items():
        store.add(name, array)
    after, report = PassManager([rope_pairs]).run(build_graph(config, context=32, prefill_chunk=8), store)
    counts = after.op_counts()
    assert counts["rope_pairs"] == 4 and "rope" not in counts and "rope_table" not in counts
    assert counts["rope_rotation"] == 1 and report.stats[0].changed == 4
    logits, state = run(after, {name: store[name] for name in after.params}, [3, 7, 11], 5)
    for actual, expected in zip(logits, expected_logits):
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)
    # The cache holds k in pair order, and v as it was.
    np.testing.assert_allclose(state["kv.0.v"], expected_state["kv.0.v"], atol=1e-5)

