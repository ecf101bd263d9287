"""Run by the Python of `.venv-gptq` (transformers + gptqmodel, `make gptq-oracle`), never by the suite's own.

    python tests/gptq_loader_child.py CHECKPOINT_DIR '[token ids]' OUT.json

Loads the GPTQ checkpoint the way a serving team would (transformers' GPTQ integration, gptqmodel's kernels) and
writes, as JSON: the logits of the ids, and every quantized linear's weight as gptqmodel dequantizes it.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

path, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu").eval()
weights = {}
for name, module in model.named_modules():
    if hasattr(module, "dequantize_weight") and hasattr(module, "qweight"):
        weights[name] = module.dequantize_weight().T.contiguous().float().tolist()  # [in, out] → [out, in]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits.float()[0]
kernel = type(model.model.layers[0].self_attn.q_proj).__name__
with open(out, "w") as f:
    json.dump(
        {"kernel": kernel, "dtype": str(next(model.parameters()).dtype), "logits": logits.tolist(), "weights": weights},
        f,
    )
