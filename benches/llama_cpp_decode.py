"""llama.cpp beside `--bin decode` (issue 15): SmolLM2-135M-Instruct's Q4_1 file requantised to
F32, F16 and BF16 with llama.cpp's own `llama_model_quantize`, then greedy decoding of the same
37-token chat prompt for 128 tokens (the end-of-sequence token ignored) on 1 and 2 threads.
Prints one markdown row per run: tokens/s from the first generated token on, as ours are counted.

Needs `llama-cpp-python` 0.3.36 built from source (see BENCHMARKS.md for the exact command).

Run: python3 benches/llama_cpp_decode.py models/SmolLM2-135M-Instruct.Q4_1.gguf [RUNS]
"""

import ctypes
import os
import sys
import time

import llama_cpp

PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TOKENS = 128
FTYPES = {"F32": 0, "F16": 1, "BF16": 32}


def requantised(source, name):
    out = source.replace(".Q4_1.gguf", f".{name}.gguf")
    if not os.path.exists(out):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[name]
        params.allow_requantize = True
        rc = llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
        if rc != 0:
            sys.exit(f"llama_model_quantize to {name} failed: {rc}")
    return out


def tokens_per_second(path, threads):
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=256,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    first, count, text = None, 0, []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if first is None:
            first = time.perf_counter()
        count += 1
        text.append(token)
        if count == TOKENS:
            break
    seconds = time.perf_counter() - first
    answer = llm.detokenize(text[:8]).decode(errors="replace").replace("\n", " ")
    return len(prompt), (count - 1) / seconds, answer


def main():
    source = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    files = {"Q4_1": source}
    files.update({name: requantised(source, name) for name in FTYPES})
    print(f"llama.cpp {llama_cpp.__version__}: {runs} runs each, the median")
    print("| weights | threads | prompt tokens | tok/s | first tokens |")
    print("|---|---|---|---|---|")
    for name in ["F32", "F16", "BF16", "Q4_1"]:
        for threads in [1, 2]:
            results = [tokens_per_second(files[name], threads) for _ in range(runs)]
            rates = sorted(r[1] for r in results)
            prompt, _, answer = results[0]
            print(f"| {name} | {threads} | {prompt} | {rates[len(rates) // 2]:.1f} | {answer} |")


if __name__ == "__main__":
    main()
