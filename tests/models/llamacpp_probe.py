"""Run by tests in a subprocess (a llama.cpp crash must fail a test, not end pytest):
read GGUF files with llama.cpp (llama-cpp-python) and print, per file, the token ids
of a text, the logits at every position and a greedy continuation, as JSON.

    python llamacpp_probe.py '{"text": "...", "files": [{"model": "m.gguf", "lora": null}], "generate": 8}'
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import llama_cpp
    import numpy as np

    job = json.loads(sys.argv[1])
    out = []
    for f in job["files"]:
        kwargs = {"model_path": f["model"], "n_ctx": 256, "logits_all": True, "verbose": False, "n_threads": 1, "seed": 0}
        if f.get("lora"):
            kwargs["lora_path"] = f["lora"]
        llm = llama_cpp.Llama(**kwargs)
        ids = llm.tokenize(job["text"].encode(), add_bos=False, special=True)
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)]).tolist()
        gen = []
        if job.get("generate"):
            llm.reset()
            for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                gen.append(int(tok))
                if len(gen) >= job["generate"]:
                    break
        out.append({"ids": ids, "scores": scores, "generated": gen, "metadata": dict(llm.metadata)})
        llm.close()
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    main()
