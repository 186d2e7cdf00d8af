"""Side by side: the frozen LLM unquantized, int8 and nf4 (model.llm.quantize), on the same model, in one run.

For each LLM (the packaged SmolLM2-135M GGUF and a larger llama built from a config, or the tiny recipe's
LLM with ``--tiny``) and each of none / int8 / nf4 it reports: the frozen LLM's bytes as held, the peak RSS
above the post-build level during stage-2 training steps (projector + stage-1 module train through the frozen
LLM; a torch AdamW step on the trainable weights, no DeepSpeed), the step time, greedy ``generate`` tokens/s,
and how often the quantized model's greedy continuation agrees with the unquantized one, token by token
(position-wise over ``--new-tokens`` tokens, and the length of the common prefix).

Every (model, method) runs in its own process, so the memory figures are that variant's alone. Images are
random pixels through the tiny recipe's vision tower (what is compared is the LLM). The machine line
(lscpu model and flags) goes into the output.

    python benchmarks/bench_quantized.py                 # SmolLM2-135M + a 210M llama, none/int8/nf4
    python benchmarks/bench_quantized.py --tiny          # seconds: the tiny recipe's LLM

The continuations above start from untrained image tokens, so one flipped token changes the rest. On a
*trained* stage-2 run, ``--run RUN --data SHARDS`` answers the held-out shards with the frozen LLM loaded
unquantized, int8 and nf4 (``mmdist eval`` with ``model.llm.quantize``), each in its own process, and reports
each one's accuracy and how often its answer equals the unquantized model's:

    python benchmarks/bench_quantized.py --run runs/demo --data "runs/demo/data/shards/eval/eval-{000000..000001}.tar"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, set_threads, tiny_recipe  # noqa: E402

METHODS = ("none", "int8", "nf4")
# A llama larger than SmolLM2-135M (213M parameters, 180M of them in linear layers), random weights.
LARGER = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colours are", "Water boils at a temperature of", "My favourite book is"]


def machine_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni") if f in flags]
    load = os.getloadavg()
    return (f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores visible, flags {' '.join(wanted)}; "
            f"load average {load[0]:.1f} at start")


def model_config(which: str, method: str) -> Any:
    """The tiny fuse recipe with ``which`` LLM and ``model.llm.quantize=method``, dtypes resolved for this CPU."""
    from mmdist.config.run import load_config
    from mmdist.precision import resolve_precision

    base = tiny_recipe("fuse")
    llm = base["model"]["llm"]
    llm["gradient_checkpointing"] = False
    if which == "smollm2":
        llm.update(name_or_path="smollm2", init_config=None, tokenizer=None)
    elif which == "larger":
        # random weights, so no tokenizer of its own: prompts are drawn as ids (prompt_ids), the byte tokenizer
        # only serves the processors
        llm.update(init_config=dict(LARGER), tokenizer="mmdist:tiny-bytes")
    llm["quantize"] = method
    base["data"]["template"] = "plain"
    base["engine"]["zero_stage"] = 2  # quantization is refused under ZeRO-3 (the recipe is ZeRO-3-ready)
    cfg = load_config(base=base)
    return resolve_precision(cfg, "cpu")[0]


def build(which: str, method: str) -> Any:
    from mmdist.models.build import build_model

    cfg = model_config(which, method)
    return build_model(cfg.model, stage=cfg.stage), cfg


def prompt_ids(model: Any, which: str, text: str) -> torch.Tensor:
    """[1, T] image placeholders then the prompt's ids (random-but-fixed ids for the tokenizer-less larger LLM)."""
    n = model.num_image_tokens
    if which != "smollm2":
        g = torch.Generator().manual_seed(sum(map(ord, text)))
        vocab = (
            min(model.llm.get_input_embeddings().num_embeddings, len(model.processors.tokenizer))
            if which == "tiny"
            else LARGER["vocab_size"]
        )
        ids = torch.randint(3, vocab - 3, (1, 12), generator=g)
    else:
        ids = torch.tensor([model.processors.tokenizer.encode(text)])
    return torch.cat([torch.full((1, n), model.image_token_id), ids], 1)


def train_batch(model: Any, which: str, batch: int, answer: int) -> dict:
    rows = [prompt_ids(model, which, PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    t = max(r.shape[1] for r in rows) + answer
    g = torch.Generator().manual_seed(0)
    vocab = model.llm.get_input_embeddings().num_embeddings
    ids = torch.full((batch, t), 0, dtype=torch.long)
    labels = torch.full((batch, t), -100, dtype=torch.long)
    mask = torch.zeros((batch, t), dtype=torch.long)
    for i, r in enumerate(rows):
        ans = torch.randint(3, min(vocab, 30000), (answer,), generator=g)
        row = torch.cat([r[0], ans])
        ids[i, :len(row)] = row
        labels[i, r.shape[1]:len(row)] = ans
        mask[i, :len(row)] = 1
    size = model.vision.image_size
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(batch, 3, size, size, generator=g)}


class PeakRSS:
    """Samples this process's RSS every 2 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(which: str, method: str, steps: int, batch: int, answer: int, new_tokens: int, prompts: int) -> dict:
    """One variant, in this process: bytes, step memory and time, generate speed, greedy continuations."""
    from mmdist.models.quantize import quantized_bytes

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, cfg = build(which, method)
    build_s = time.perf_counter() - t0
    frozen = quantized_bytes(model.llm)
    params = [p for group in model.trainable_groups().values() for p in group]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    data = train_batch(model, which, batch, answer)
    model.train()
    optimizer.zero_grad()
    model(data)["loss"].backward()  # warm-up step (allocator, kernels), not timed
    optimizer.step()
    times = []
    with PeakRSS() as rss:
        for _ in range(steps):
            t = time.perf_counter()
            optimizer.zero_grad()
            model(data)["loss"].backward()
            optimizer.step()
            times.append(time.perf_counter() - t)
    model.eval()
    gen_tokens, gen_s, continuations = 0, 0.0, []
    size = model.vision.image_size
    for i in range(prompts):
        ids = prompt_ids(model, which, PROMPTS[i % len(PROMPTS)])
        pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(i))
        t = time.perf_counter()
        out = model.generate(ids, pixel_values=pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        gen_s += time.perf_counter() - t
        gen_tokens += out.shape[1]
        continuations.append(out[0].tolist())
    return {
        "model": which,
        "method": method,
        "llm_dtype": cfg.model.llm.dtype,
        "build_s": round(build_s, 1),
        "frozen_bytes": frozen,
        "step_s": sorted(times)[len(times) // 2],
        "step_peak_mb": (rss.peak - rss.start) / 2**20,
        "rss_mb": rss.start / 2**20,
        "gen_tok_s": gen_tokens / gen_s,
        "continuations": continuations,
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(position-wise agreement %, mean common-prefix length) of two sets of greedy continuations."""
    same = total = prefix = 0
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        same += sum(int(p == q) for p, q in zip(x[:n], y[:n]))
        total += n
        k = 0
        while k < n and x[k] == y[k]:
            k += 1
        prefix += k
    return 100.0 * same / max(1, total), prefix / max(1, len(a))


def answers_of(run: str, data: list[str], method: str, out: Path, max_samples: int | None, threads: int | None) -> dict:
    """``mmdist eval`` of ``run`` with ``model.llm.quantize=method`` in its own process: accuracy, time and answers."""
    cmd = [sys.executable, "-m", "mmdist", "eval", "--run", run, "--data", *data,
           *(["--max-samples", str(max_samples)] if max_samples else []),
           "--device", "cpu", "--match", "digit", "--out", str(out / method), f"model.llm.quantize={method}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"mmdist eval ({method}) failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    metrics = json.loads((out / method / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / method / "answers.jsonl").read_text().splitlines()]
    return {"method": method, "samples": metrics["samples"], "accuracy_%": 100.0 * metrics["exact"],
            "eval_s": time.perf_counter() - start, "answers": {r["key"]: r["answer"] for r in rows}}


def heldout_agreement(args: argparse.Namespace) -> list[dict]:
    """The held-out answers of a trained run, unquantized and quantized, side by side (see the module docstring)."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_quantized_") as tmp:
        for method in ["none", *[m for m in args.methods if m != "none"]]:
            r = answers_of(args.run, args.data, method, Path(tmp), args.max_samples, args.threads)
            base = rows[0] if rows else r
            common = sorted(set(base["answers"]) & set(r["answers"]))
            assert common, f"{method}: no held-out key in common with the unquantized run"
            r["agree_%"] = 100.0 * sum(base["answers"][k] == r["answers"][k] for k in common) / len(common)
            rows.append(r)
            print(f"  {method}: accuracy {r['accuracy_%']:.1f}%, same answer as unquantized {r['agree_%']:.1f}% "
                  f"of {len(common)}, {r['eval_s']:.0f} s", flush=True)
    return rows


def run_child(args: argparse.Namespace, which: str, method: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, method, "--steps", str(args.steps), "--batch", str(args.batch),
           "--answer", str(args.answer), "--new-tokens", str(args.new_tokens), "--prompts", str(args.prompts)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"{which} {method} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny recipe's LLM only, few steps: runs in seconds")
    parser.add_argument("--models", nargs="+", default=None, help="smollm2, larger, tiny (default: smollm2 larger)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=5, help="timed stage-2 steps per variant (the median is reported)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--answer", type=int, default=8, help="answer tokens per sample (the loss positions)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--run", default=None, help="a trained stage-2 run (or export / demo folder): held-out answers instead"
    )
    parser.add_argument("--data", nargs="+", default=None, help="with --run: the held-out shards")
    parser.add_argument("--max-samples", type=int, default=None, help="with --run: answer at most this many")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        if not args.data:
            parser.error("--run needs --data (the held-out shards)")
        machine = machine_line()
        print(f"machine: {machine}; torch {torch.__version__}; held-out answers of {args.run}")
        rows = heldout_agreement(args)
        print(format_table(rows, ["method", "samples", "accuracy_%", "agree_%", "eval_s"]))
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine, "run": args.run, "rows": [
                {k: v for k, v in r.items() if k != "answers"} for r in rows]}, indent=1))
        return 0
    if args.tiny:
        args.models = args.models or ["tiny"]
        args.steps, args.prompts, args.new_tokens = min(args.steps, 2), min(args.prompts, 2), min(args.new_tokens, 8)
    models = args.models or ["smollm2", "larger"]
    if args.child:
        set_threads(args.threads)
        result = measure(*args.child, args.steps, args.batch, args.answer, args.new_tokens, args.prompts)
        print("RESULT " + json.dumps(result))
        return 0
    machine = machine_line()
    print(f"machine: {machine}; torch {torch.__version__}, {args.threads or len(os.sched_getaffinity(0))} threads")
    rows = []
    for which in models:
        base = None
        for method in args.methods:
            r = run_child(args, which, method)
            if method == "none":
                base = r
            if base is not None:
                r["bytes_x"] = r["frozen_bytes"] / base["frozen_bytes"]
                r["agree_%"], r["prefix"] = agreement(base["continuations"], r["continuations"])
                r["step_x"] = r["step_s"] / base["step_s"]
            r["frozen_mb"] = r["frozen_bytes"] / 2**20
            rows.append(r)
            print(
                f"  {which} {method}: " + json.dumps({k: v for k, v in r.items() if k != "continuations"}), flush=True
            )
    columns = ["model", "method", "llm_dtype", "frozen_mb", "bytes_x", "step_s", "step_x", "step_peak_mb", "rss_mb",
               "gen_tok_s", "agree_%", "prefix"]
    print(format_table(rows, columns))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": machine, "rows": [{k: v for k, v in r.items() if k != "continuations"} for r in rows]},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
