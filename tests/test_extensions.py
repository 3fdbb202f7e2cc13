"""Extending from outside the package: GPT-2 and Mixtral written with the public API only (examples/
architectures/), loaded as plugins, against transformers' own outputs (tests/fixtures/extensions, made by
tests/oracle/make_extension_golden.py); plugins from the CLI; derive_param; check_kernels."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest

import minitorch_infer
from minitorch_infer import MinitorchError
from minitorch_infer.architectures import ARCHITECTURES, llama
from minitorch_infer.backends import numpy as numpy_backend
from minitorch_infer.cli import main
from minitorch_infer.ir import TensorType, functional as F, trace
from minitorch_infer.passes import PassManager, check_kernels, check_pass, derive_param, register_pass
from minitorch_infer.passes.manager import PassResult
from minitorch_infer.plugins import load_plugin
from minitorch_infer.serving.app import serving_in_thread

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "extensions"
PLUGINS = {"gpt2_tiny": ROOT / "examples" / "architectures" / "gpt2.py",
           "mixtral_tiny": ROOT / "examples" / "architectures" / "mixtral.py"}


@pytest.fixture(autouse=True)
def no_plugins_leak_into_other_tests(monkeypatch):
    """--plugin sets MINITORCH_PLUGINS for the processes the CLI starts; it ends with the test."""
    monkeypatch.setenv("MINITORCH_PLUGINS", "")


def load_fixture(name, **options):
    load_plugin(str(PLUGINS[name]))
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    return minitorch_infer.load(FIXTURES / name, **options), expected, np.load(FIXTURES / name / "logits.npy")


@pytest.mark.parametrize("name", PLUGINS)
@pytest.mark.parametrize("passes", [None, []], ids=["optimised", "unoptimised"])
def test_logits_and_greedy_ids_equal_transformers(name, passes):
    model, expected, logits = load_fixture(name, passes=passes)
    assert np.abs(model.logits(expected["input_ids"]) - logits).max() < 1e-4
    result = model.generate(expected["input_ids"], max_new_tokens=8, greedy=True, ignore_eos=True)
    assert result.token_ids == expected["greedy_ids"] == expected["hf_generate_ids"]


@pytest.mark.parametrize("name", PLUGINS)
def test_the_batched_engine_gives_each_prompt_what_generate_gives_it(name):
    model, expected, _ = load_fixture(name)
    prompts = [expected["input_ids"], expected["input_ids"][:7], "Hello there"]
    batch = model.generate_batch(prompts, max_new_tokens=6, greedy=True, ignore_eos=True)
    assert batch[0].token_ids == expected["greedy_ids"][:6]
    for prompt, result in zip(prompts, batch):
        assert result.token_ids == model.generate(prompt, max_new_tokens=6, greedy=True, ignore_eos=True).token_ids


@pytest.mark.parametrize("name", PLUGINS)
def test_served_over_the_openai_api(name):
    model, _, _ = load_fixture(name)
    expected = model.generate("Hello", max_new_tokens=6, greedy=True, ignore_eos=True).text
    with serving_in_thread(load_fixture(name)[0], name) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model=name, prompt="Hello", temperature=0, max_tokens=6,
                                          extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected


@pytest.mark.parametrize("name", PLUGINS)
def test_cli_generate_and_graph_with_plugin(name, tmp_path, capsys):
    model, _, _ = load_fixture(name)
    expected = model.generate("Hello", max_new_tokens=5, greedy=True, ignore_eos=True).text
    assert main(["generate", "--plugin", str(PLUGINS[name]), "-m", str(FIXTURES / name), "-p", "Hello", "-n", "5",
                 "--greedy", "--ignore-eos", "-q", "--dump-dot", str(tmp_path / "g.dot")]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()
    drawn = (tmp_path / "g.dot").read_text()
    if name == "mixtral_tiny":
        for op in ("moe_route", "matmul_id", "moe_combine", "swiglu"):     # the routing, and the fused experts
            assert op in drawn


def test_a_plugin_pass_runs_from_the_cli_in_a_fresh_process(tmp_path):
    """The issue's case: a pass registered outside the package, named in --passes."""
    plugin = tmp_path / "my_passes.py"
    plugin.write_text("from minitorch_infer.passes import PassResult, register_pass\n"
                      "@register_pass('count_nodes')\n"
                      "def count_nodes(graph, ctx):\n"
                      "    return PassResult(graph, 0, {'nodes': len(graph.nodes)})\n")
    done = subprocess.run([sys.executable, "-m", "minitorch_infer", "graph", "--plugin", str(plugin), "--passes",
                           "fuse_qkv,count_nodes,dce", "--text", "-m", str(FIXTURES / "gpt2_tiny"), "--plugin",
                           str(PLUGINS["gpt2_tiny"])], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "count_nodes" in done.stderr and "graph gpt2_last_logits" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "minitorch_infer", "graph", "--plugin", "no_such_plugin_module",
                              "--text"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2
    assert "plugin 'no_such_plugin_module': no module named 'no_such_plugin_module'" in missing.stderr


def test_an_unregistered_architecture_names_the_registered_ones(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(minitorch_infer.UnsupportedModelError, match="LlamaForCausalLM.*docs/extending.md"):
        minitorch_infer.load(folder)


def test_architectures_llama_is_the_module_and_patching_it_takes_effect(monkeypatch):
    assert llama.__name__ == "minitorch_infer.architectures.llama"
    model = minitorch_infer.load("story", passes=[])
    traced = model.trace()
    monkeypatch.setattr(llama, "mlp_block", lambda x, c, i: x * 0.0)
    patched = model.trace()
    assert sum(n.op == "silu" for n in traced.nodes) > 0 == sum(n.op == "silu" for n in patched.nodes)
    assert ARCHITECTURES["LlamaForCausalLM"].build is llama.llama


def test_decode_reads_only_the_chosen_experts():
    """matmul_id on one token: experts that are not chosen hold NaN, and the output stays finite."""
    load_plugin(str(PLUGINS["mixtral_tiny"]))
    weights = np.full((6, 5, 4), np.nan, np.float32)
    rng = np.random.default_rng(0)
    weights[[1, 4]] = rng.standard_normal((2, 5, 4))
    x, experts, out = rng.standard_normal((1, 4)).astype(np.float32), np.array([[4, 1]], np.int32), np.empty((1, 2, 5),
                                                                                                          np.float32)
    from minitorch_infer.ir import Graph
    graph = Graph("one")
    node = graph.create_node("matmul_id", [graph.add_input("x", TensorType((1, 4), "f32")),
                                            graph.param("w", TensorType((6, 5, 4), "f32")),
                                            graph.add_input("e", TensorType((1, 2), "i32"))], {}, {})
    numpy_backend.KERNELS["matmul_id"](node, [x, weights, experts], [out], None, None)()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], np.stack([weights[4] @ x[0], weights[1] @ x[0]]), rtol=1e-6)


def test_mixtral_graph_routes_and_fuses_inside_experts():
    model, _, _ = load_fixture("mixtral_tiny")
    ops = [node.op for node in model.graph.nodes]
    assert ops.count("moe_route") == 2 and ops.count("matmul_id") == 4 and ops.count("swiglu") == 2
    assert "mul" not in ops                                 # silu(gate) * up became one swiglu per layer
    fused = {s.name: s.changed for s in model.pass_report.stats}
    assert fused["fuse_expert_gate_up"] == 2 and fused["fuse_qkv"] == 2
    assert not any("+up" in name for name in model.weights)     # the derived packing stays out of the store
    check_pass(model.trace(), model.passes, model.weights, kernels=True)


def test_check_kernels_names_the_op_whose_numpy_kernel_is_wrong(monkeypatch):
    graph = minitorch_infer.load("story", passes=[]).trace()
    assert check_kernels(graph) < 1e-4
    right = numpy_backend.KERNELS["silu"]

    def off_by_a_bit(node, ins, outs, scratch, step):
        call = right(node, ins, outs, scratch, step)
        return lambda: (call(), outs[0].__iadd__(np.float32(1e-2)))

    monkeypatch.setitem(numpy_backend.KERNELS, "silu", off_by_a_bit)
    with pytest.raises(AssertionError, match=r"node %\d+ = silu\(.*op 'silu', traced at llama.py:\d+\) on the prefill"):
        check_kernels(graph)
    with pytest.raises(AssertionError, match="op 'silu'"):
        check_pass(graph, ["dce"], kernels=True)


def test_check_kernels_runs_a_step_of_two_sequences(monkeypatch):
    """A last_row kernel that is right for one sequence only (every sequence gets the step's last row)."""
    graph = minitorch_infer.load("story", passes=[]).trace()

    def step_s_last_row_for_all(node, ins, outs, scratch, step):
        (x,), (y,) = ins, outs
        return lambda: y.__setitem__(slice(None), x[-1])

    monkeypatch.setitem(numpy_backend.KERNELS, "last_row", step_s_last_row_for_all)
    with pytest.raises(AssertionError, match=r"op 'last_row'.* on the two-sequence step \(S=3, T=\[\d+, 5\]\)"):
        check_kernels(graph)


def test_derive_param_works_on_real_and_plain_weights_and_never_leaks():
    """Fold each RMSNorm gain into the matmul that reads the norm's output, as a derived weight."""
    from minitorch_infer.passes import P, rewrite

    x = P.var("x")
    NORM_MATMUL = P("matmul", P("rms_norm", x, P.param("gain")), P.param("w"))

    @register_pass("test_fold_gain")
    def fold_gain(graph, ctx):
        def build(m):
            w, gain = m["w"], m["gain"]
            if gain.name.startswith("ones."):
                return None                                  # already folded
            folded = derive_param(graph, ctx, f"{w.name}*gain", w.type.shape,
                                  lambda weights: weights[w.name] * weights[gain.name][None, :])
            ones = derive_param(graph, ctx, f"ones.{gain.type.shape[0]}", gain.type.shape,
                                lambda weights: np.ones(gain.type.shape, np.float32))
            return m.insert("matmul", m.insert("rms_norm", m["x"], ones, eps=m.root.inputs[0].producer.attrs["eps"]),
                            folded)
        return rewrite(graph, NORM_MATMUL, build)

    model = minitorch_infer.load("story", passes=[])
    names = set(model.weights)
    optimised, report = check_pass(model.trace(), ["test_fold_gain", "dce"], model.weights, kernels=True)
    assert report.stats[0].changed > 0 and set(model.weights) == names          # real weights: nothing added
    plain = {name: np.array(model.weights[name]) for name in model.weights}
    check_pass(model.trace(), ["test_fold_gain", "dce"], plain)
    assert set(plain) == names                                                   # a plain dict: nothing added
    model.compile(passes=["test_fold_gain", "dce"])
    assert set(model.weights) == names
    assert model.generate("Once upon a time", max_new_tokens=8, greedy=True).text == \
        minitorch_infer.load("story").generate("Once upon a time", max_new_tokens=8, greedy=True).text


def test_bos_is_the_tokenizers_by_default_and_add_bos_chooses():
    story = minitorch_infer.load("story")
    bos = story.config.bos_token_id
    assert story.encode("Hi")[0] == bos and story.encode("Hi", add_bos=False)[0] != bos   # the story tokenizer adds BOS
    assert story.encode([5, 6]) == [5, 6] and story.encode([5, 6], add_bos=True) == [bos, 5, 6]
    assert story.encode([bos, 5], add_bos=True) == [bos, 5]
    assert story.generate("Hi", add_bos=False, max_new_tokens=2, greedy=True).prompt_ids == story.encode("Hi")[1:]
    mixtral, _, _ = load_fixture("mixtral_tiny")                 # its tokenizer_config says add_bos_token: true
    gpt2, _, _ = load_fixture("gpt2_tiny")                       # and GPT-2's does not
    assert mixtral.encode("Hi")[0] == 256 and gpt2.encode("Hi") == list(b"Hi")
    assert gpt2.encode("Hi", add_bos=True) == [gpt2.config.bos_token_id, *b"Hi"]


def test_an_installed_package_s_plugin_is_found_by_its_entry_point(tmp_path):
    """A package that lists a module in the minitorch_infer.plugins group: its pass works from --passes."""
    (tmp_path / "my_installed_passes.py").write_text(
        "from minitorch_infer.passes import PassResult, register_pass\n"
        "@register_pass('installed_noop')\n"
        "def installed_noop(graph, ctx):\n"
        "    return PassResult(graph)\n")
    dist = tmp_path / "my_installed_passes-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-installed-passes\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[minitorch_infer.plugins]\nnoop = my_installed_passes\n")
    done = subprocess.run([sys.executable, "-m", "minitorch_infer", "graph", "--passes", "installed_noop,dce",
                           "--text"], capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "installed_noop" in done.stderr


def test_batch_with_a_plugin_architecture(tmp_path):
    model, expected, _ = load_fixture("gpt2_tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": "Hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
                       + "\n")
    assert main(["batch", str(prompts), "-o", str(tmp_path / "out.jsonl"), "--plugin", str(PLUGINS["gpt2_tiny"]),
                 "-m", str(FIXTURES / "gpt2_tiny"), "-q"]) == 0
    (line,) = (tmp_path / "out.jsonl").read_text().splitlines()
    assert json.loads(line)["text"] == model.generate("Hello", max_new_tokens=5, greedy=True, ignore_eos=True).text


def test_gpt2_refuses_a_context_past_its_learned_positions(capsys):
    load_plugin(str(PLUGINS["gpt2_tiny"]))
    assert main(["generate", "-m", str(FIXTURES / "gpt2_tiny"), "--context", "65", "-p", "Hi"]) == 2
    assert "a context of 65 positions, but GPT-2 learned n_positions = 64" in capsys.readouterr().err
