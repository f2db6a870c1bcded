"""The course notebook's way of sampling: one text-generation pipeline call per sample.

Run by bench_cpu_grid.py as a whole process; prints one JSON line with its own timings.
Usage: notebook_way.py MODEL_DIR PROMPT_TEXT_FILE N MAX_NEW_TOKENS TEMPERATURE
"""

import json
import sys
import time

started = time.perf_counter()
import torch  # noqa: E402
from transformers import pipeline  # noqa: E402

model_dir, prompt_file, n, max_new_tokens, temperature = sys.argv[1:6]
n, max_new_tokens, temperature = int(n), int(max_new_tokens), float(temperature)
prompt = open(prompt_file, encoding="utf-8").read()

pipe = pipeline("text-generation", model=model_dir, tokenizer=model_dir, device="cpu", dtype=torch.float32)
loaded = time.perf_counter()
tokens = 0
torch.manual_seed(0)
for _ in range(n):  # the notebook: one call, one sample, one after the other
    out = pipe(prompt, do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
               min_new_tokens=max_new_tokens, return_full_text=False)
    tokens += len(pipe.tokenizer.encode(out[0]["generated_text"], add_special_tokens=False))
done = time.perf_counter()
print(json.dumps({"load_s": loaded - started, "generate_s": done - loaded, "samples": n,
                  "tokens": n * max_new_tokens, "retokenized": tokens}))
