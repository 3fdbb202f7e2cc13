"""Chat with SmolLM2-135M-Instruct (fetch it first: minitorch-infer fetch smollm2-135m-instruct).

    python examples/chat.py                       # interactive: /reset, /undo, /exit
    printf 'Hi!\nWhat is 2+2?\n' | python examples/chat.py --greedy
"""

import sys

from minitorch_infer.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
