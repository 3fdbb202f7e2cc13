"""From logits to text: the generation loop, sampling, stop strings, the streaming detokenizer, chat
sessions and their templates. It drives a model through `loop.Model`'s few calls and never sees the graph."""
