"""Generate text from a model, streamed token by token (the story model by default).

    python examples/generate.py --prompt "Once upon a time" --max-new-tokens 64 --seed 1
    python examples/generate.py --greedy --stats --dump-dot story.dot
    python examples/generate.py --help          # every flag
"""

import sys

from minitorch_infer.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
