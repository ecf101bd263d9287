"""File and folder formats: bnb 4-bit folders, PEFT adapters, GPTQ v1 folders, GGUF files, atomic writes."""
