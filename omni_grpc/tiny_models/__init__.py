"""Small diffusers pipelines with random weights, built from code (tokenizers included): the embedded
default model and the benchmark's models. Nothing here touches a model hub."""
