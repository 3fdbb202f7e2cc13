"""Model files in, canonical float32 weights out: the safetensors and GGUF readers, GGML dequantisation,
the WeightStore, the GGUF tokenizer, where model files are looked up, and fetch/convert tooling."""
