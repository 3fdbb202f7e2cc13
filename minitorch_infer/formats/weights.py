"""WeightStore: float32 arrays by canonical name, and the map from HF tensor names onto those names.

Canonical names are short and match the graph's params (`layers.3.attn.q`, `layers.3.mlp.gate`). A pass
that packs weights (q|k|v, gate|up) asks the store to `pack` them: the packed array is built once and the
originals become views into it, so packing costs no extra memory.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..config import read_json_object
from ..errors import ModelFormatError, shown
from ..panelled import PANEL, PanelledWeight
from ..quantized import QuantizedPanels, QuantizedTensor, stack_quantized, weight_type
from .safetensors_file import read_safetensors

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "mlp_norm",
    "self_attn.q_proj.weight": "attn.q",
    "self_attn.k_proj.weight": "attn.k",
    "self_attn.v_proj.weight": "attn.v",
    "self_attn.o_proj.weight": "attn.o",
    "self_attn.q_proj.bias": "attn.q_bias",
    "self_attn.k_proj.bias": "attn.k_bias",
    "self_attn.v_proj.bias": "attn.v_bias",
    "self_attn.o_proj.bias": "attn.o_bias",
    "mlp.gate_proj.weight": "mlp.gate",
    "mlp.up_proj.weight": "mlp.up",
    "mlp.down_proj.weight": "mlp.down",
    "mlp.gate_proj.bias": "mlp.gate_bias",
    "mlp.up_proj.bias": "mlp.up_bias",
    "mlp.down_proj.bias": "mlp.down_bias",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
_LAYER_PATTERN = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some checkpoints carry that the engine recomputes itself.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def canonical_name(hf_name: str) -> str | None:
    """The engine's name for an HF tensor name; None for tensors that are safe to ignore."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _LAYER_PATTERN.fullmatch(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    if _IGNORED.fullmatch(hf_name):
        return None
    return hf_name


def hf_name(canonical: str) -> str:
    """The HF tensor name for a canonical name (inverse of canonical_name)."""
    for hf, name in _GLOBAL_NAMES.items():
        if name == canonical:
            return hf
    layer, _, rest = canonical.removeprefix("layers.").partition(".")
    for hf, name in _LAYER_NAMES.items():
        if name == rest:
            return f"model.layers.{layer}.{hf}"
    return canonical


def stack_rows(parts: list) -> np.ndarray | QuantizedTensor:
    """The parts stacked along axis 0 into a new float32 array, column-major when 2-D (quantised parts, all
    of one type: into a new QuantizedTensor).

    Column-major, written once here rather than copied later: x·Wᵀ with Wᵀ row-major is BLAS's plain
    product, 20-60% faster in prefill than reading [out, in] rows (measured on SmolLM2's shapes). A decode
    step's matrix-vector products pay about 1.5% for it (SmolLM2's bound: 57.6 vs 58.5 tok/s, one process).
    A later machine (OpenBLAS 0.3.31, AVX-512) had column-major faster for decode too (that chain 8-12%) and
    no different in prefill.
    """
    if any(isinstance(p, QuantizedPanels) for p in parts):    # a program laid them out in panels
        parts = [p.blocks() if isinstance(p, QuantizedPanels) else p for p in parts]
    if any(isinstance(p, QuantizedTensor) for p in parts):
        return stack_quantized(parts)
    packed = np.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), np.float32, order="F")
    start = 0
    for part in parts:
        packed[start:start + part.shape[0]] = part
        start += part.shape[0]
    return packed


def _only_the_store_reads(array: np.ndarray) -> bool:
    """Whether no one but the store (through its entry, or a caller's local) can read `array`'s memory: nothing else
    refers to it, nor to the array it may be a whole view of (a dequantised weight reshaped)."""
    # getrefcount counts its argument; the store's entry and the caller's local make up the rest.
    if sys.getrefcount(array) > 4:
        return False
    base = array.base
    if base is None:
        return True
    whole_view = isinstance(base, np.ndarray) and base.base is None and base.size == array.size
    return whole_view and sys.getrefcount(base) == 3     # `base`, the view's own reference and the argument


def _quantized_part(panelled: QuantizedPanels, whole: QuantizedTensor, part: QuantizedTensor
                    ) -> QuantizedPanels | QuantizedTensor:
    """`part`, a slice of rows of `whole` (QuantizedTensor.take_rows), as the same rows of `whole`'s panels where
    it is whole panels of them, else a copy of its own."""
    start = (part.codes.ctypes.data - whole.codes.ctypes.data) // whole.codes.strides[0]
    if start % PANEL == 0 and part.shape[0] % PANEL == 0:
        return panelled.take_rows(slice(start, start + part.shape[0]))
    return QuantizedTensor(part.kind, part.shape, *(None if a is None else np.array(a) for a in part._arrays()))


def _panelled_part(panelled: PanelledWeight, whole: np.ndarray, part: np.ndarray) -> PanelledWeight | np.ndarray:
    """`part`, a view of rows of `whole`, as the same rows of `whole`'s panels where it is whole panels of them."""
    start = (part.ctypes.data - whole.ctypes.data) // whole.strides[0]
    rows = slice(start, start + part.shape[0])
    same_rows = part.strides == whole.strides and part.shape[1:] == whole.shape[1:]
    if same_rows and rows.start % PANEL == 0 and rows.stop % PANEL == 0:
        return panelled.take_rows(rows)
    return np.array(part)


class WeightStore:
    def __init__(self, source: str = "<weights>"):
        self.source = source
        self._arrays: dict[str, np.ndarray] = {}
        self._origin: dict[str, str] = {}   # canonical name -> name in the file, for error messages
        self._file: dict[str, str] = {}     # canonical name -> the file it came from, when not `source` itself

    def add(self, name: str, array: np.ndarray, origin: str | None = None, file: str | None = None) -> None:
        where = file or self.source
        if not isinstance(array, QuantizedTensor) and array.dtype != np.float32:
            raise ModelFormatError(f"{where}: tensor {shown(origin or name)} is {array.dtype}, expected float32")
        if name in self._arrays:
            raise ModelFormatError(f"{where}: tensor {shown(origin or name)} appears twice (also in {self.file(name)})")
        self._arrays[name] = array
        self._origin[name] = origin or name
        if file is not None:
            self._file[name] = file

    def add_hf_tensors(self, tensors: Iterable[tuple[str, np.ndarray]], file: str | None = None,
                       rename: Callable[[str], str | None] = canonical_name) -> None:
        """Add a file's tensors under the names `rename` gives them (default: the Llama family's canonical
        names); tensors it maps to None are skipped."""
        for name, array in tensors:
            canonical = rename(name)
            if canonical is not None:
                self.add(canonical, array, origin=name, file=file)

    def replace(self, name: str, array: np.ndarray | QuantizedTensor) -> None:
        """Swap in a rearranged or converted copy of a weight (same shape), e.g. q/k rows reordered for RoPE, or
        the weight quantised."""
        old = self._arrays[name]
        if array.shape != old.shape or not isinstance(array, QuantizedTensor) and array.dtype != np.float32:
            raise ModelFormatError(f"{self.source}: replacement for {name!r} must be {list(old.shape)}, float32 "
                                   f"or quantised, not {weight_type(array)}{list(array.shape)}")
        self._arrays[name] = array

    def convert(self, name: str, array: np.ndarray) -> None:
        """Swap in the weight in another layout or shape (an architecture's prepare_weights: GPT-2's Conv1D
        [in, out] as [out, in], say); the shape check against the graph comes after."""
        if array.dtype != np.float32:
            raise ModelFormatError(f"{self.source}: converted {name!r} must be float32, got {array.dtype}")
        self._arrays[name] = array

    def remove(self, name: str) -> np.ndarray:
        """Take a weight out (an architecture's prepare_weights, after stacking it into another)."""
        self._origin.pop(name, None)
        self._file.pop(name, None)
        return self._arrays.pop(name)

    def panelise(self, name: str) -> PanelledWeight | QuantizedPanels:
        """Hold a weight in panels (see minitorch_infer.panelled, and quantized.QuantizedPanels for quantised
        blocks) instead of row-major, and with it every weight that is a view into it (a packed weight's parts),
        so that no weight is held in both layouts. A part that is not whole panels becomes a copy of its own. A
        row-major float32 array that only the store holds (a weight dequantised at load) is rewritten in place;
        another (memory-mapped, a packed weight's parts, or held elsewhere too) is copied, and so are quantised
        blocks, one weight at a time."""
        array = self._arrays[name]
        if isinstance(array, (PanelledWeight, QuantizedPanels)):
            return array
        if isinstance(array, QuantizedTensor):
            panelled = QuantizedPanels.of(array)
            for other, part in self._arrays.items():
                if (other != name and isinstance(part, QuantizedTensor)
                        and np.may_share_memory(part.codes, array.codes)):
                    self._arrays[other] = _quantized_part(panelled, array, part)
            self._arrays[name] = panelled
            return panelled
        if _only_the_store_reads(array) and array.flags.c_contiguous and array.flags.writeable:
            panelled = PanelledWeight.rewritten(array)
        else:
            panelled = PanelledWeight.of(array)
        for other, part in self._arrays.items():
            if other != name and isinstance(part, np.ndarray) and np.may_share_memory(part, array):
                self._arrays[other] = _panelled_part(panelled, array, part)
        self._arrays[name] = panelled
        return panelled

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def layer_count(self) -> int:
        """How many distinct layer indices the stored tensors carry."""
        return len({name.split(".")[1] for name in self._arrays if name.startswith("layers.")})

    def origin(self, name: str) -> str:
        return self._origin.get(name, name)

    def file(self, name: str) -> str:
        """The file a weight was read from (a shard, model.safetensors, the .gguf), for error messages."""
        return self._file.get(name, self.source)

    @property
    def nbytes(self) -> int:
        """Bytes held, counting a packed array once (its parts are views into it)."""
        roots = {}
        for weight in self._arrays.values():
            if isinstance(weight, (QuantizedTensor, QuantizedPanels)):
                parts = (weight.scales, weight.offsets, weight.codes)
            else:
                parts = (weight.panels if isinstance(weight, PanelledWeight) else weight,)
            for array in parts:
                if array is not None:
                    root = array.base if isinstance(array.base, np.ndarray) else array
                    roots[id(root)] = root.nbytes
        return sum(roots.values())

    def pack(self, new_name: str, names: list[str]) -> np.ndarray:
        """Stack weights along axis 0 under `new_name` (see `stack_rows`); the originals become views into the
        result, so packing costs no memory. Those views are strided both ways: a graph that still reads them
        (compiled without the fusing passes) runs correctly, only slower."""
        if new_name in self._arrays:
            return self._arrays[new_name]
        packed = stack_rows([self._arrays[n] for n in names])
        start = 0
        for name in names:
            rows = self._arrays[name].shape[0]
            part = slice(start, start + rows)
            self._arrays[name] = packed.take_rows(part) if isinstance(packed, QuantizedTensor) else packed[part]
            start += rows
        self.add(new_name, packed, origin=" | ".join(self.origin(n) for n in names))
        return packed

    def tie_embeddings(self) -> bool:
        """For a tied model, keep one matrix as both embedding and head; checkpoints store either name or both.

        Returns False when both are stored and differ: then, as transformers does, each is used as stored.
        """
        if "lm_head" not in self._arrays:
            return True
        if "embed" in self._arrays and not _same_weight(self._arrays["embed"], self._arrays["lm_head"]):
            return False
        head, origin = self._arrays.pop("lm_head"), self._origin.pop("lm_head")
        if "embed" not in self._arrays:
            self.add("embed", head, origin=origin)
        return True

    def check_params(self, params: dict, config_source: str) -> None:
        """Every param the graph needs is here with the shape the config implies, and nothing is left over."""
        for name, value in params.items():
            if name not in self._arrays:
                raise ModelFormatError(
                    f"{self.source}: missing tensor {shown(hf_name(name))}, which {config_source} implies "
                    f"with shape {list(value.type.shape)}")
            shape = tuple(self._arrays[name].shape)
            if shape != tuple(value.type.shape):
                raise ModelFormatError(
                    f"{self.file(name)}: tensor {shown(self.origin(name))} has shape {list(shape)}, but {config_source} "
                    f"implies {list(value.type.shape)}")
        unused = sorted(set(self._arrays) - set(params))
        if unused:
            listed = ", ".join(shown(self.origin(n)) for n in unused[:5])
            files = {self.file(n) for n in unused}
            raise ModelFormatError(
                f"{files.pop() if len(files) == 1 else self.source}: {len(unused)} tensor(s) not used by the architecture in {config_source}: {listed}"
                " (does the config match the weights? e.g. attention_bias, tie_word_embeddings)")


def _same_weight(a, b) -> bool:
    if isinstance(a, QuantizedTensor):
        return a.same_as(b)
    return not isinstance(b, QuantizedTensor) and np.array_equal(a, b)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF model folder: the shards an index names, or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        paths = [model_dir / name for name in _shard_names(index)]
        for path in paths:
            if not _is_file(path):
                raise ModelFormatError(f"{index}: shard {shown(path.name)} is missing")
        return paths
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise ModelFormatError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    return found


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system, which no shard can have
        return False


def _shard_names(index: Path) -> list[str]:
    """The distinct file names the index's weight_map points to; each must be a file in the model folder."""
    weight_map = read_json_object(index, "the shard index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelFormatError(f"{index}: weight_map must be an object mapping tensor names to file names, "
                               f"got {type(weight_map).__name__}")
    names = set()
    for tensor, name in weight_map.items():
        # a bare name: "../x", "/etc/x", "." and "" would all reach outside the folder or at the folder itself
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ModelFormatError(f"{index}: weight_map[{shown(tensor)}] = {shown(name)} is not a file name in the "
                                   "model folder")
        names.add(name)
    return sorted(names)


def load_safetensors_dir(model_dir: Path, rename: Callable[[str], str | None] = canonical_name) -> WeightStore:
    """Every tensor of the folder's safetensors files, named by `rename` (see WeightStore.add_hf_tensors)."""
    store = WeightStore(source=str(model_dir))
    for path in safetensors_files(model_dir):
        store.add_hf_tensors(read_safetensors(path), file=str(path), rename=rename)
    return store
