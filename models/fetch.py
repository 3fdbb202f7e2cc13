"""Download model files into this folder: `python models/fetch.py [name ...]` (default: smollm2-135m-instruct)."""

import sys
from pathlib import Path

from minitorch_infer.errors import MinitorchError
from minitorch_infer.formats.fetch import fetch_model


def main() -> None:
    try:
        for name in sys.argv[1:] or ["smollm2-135m-instruct"]:
            print(fetch_model(name, models_dir=Path(__file__).resolve().parent))
    except MinitorchError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
