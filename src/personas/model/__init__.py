"""The model: chat prompts (no torch), resolving `--model` (no torch), loading it once, GPTQ kernels."""
