"""The one GPU check: the figures megalm's GPU targets need, each side by side in one time-boxed run.

    bash bench/gpu_check.sh                          # on the GPU machine: install the carried wheels, then this
    python bench/gpu_check.py --out DIR [--budget S]  # the parts below, each a subprocess with its own timeout
    python bench/gpu_check.py --dry-run --out DIR    # every part at tiny sizes on CPU (tests/bench runs this)

Parts, in order of what they settle (a part that fails or runs out of time is reported; the rest still run):
  env          GPU, driver, versions; the measured bf16 matmul peak (8192^3) that MFU is also reported against
  llama_fused  configs/llama_1b.yaml (1.1B, seq 4096, bf16), megalm's fused path: flash attention and the fused
               norm/RoPE/SwiGLU kernels (model.kernels=triton): tokens/s, TFLOP/s, MFU, peak memory
  llama_eager  the same with torch SDPA attention and eager torch ops (model.kernels=torch), side by side
  kernels      bench/kernels.py: attention fwd and fwd+bwd vs SDPA's flash, cuDNN and efficient backends, softmax
  ops          bench/ops.py: each fused op vs torch eager, torch.compile of it and Liger-Kernel (llama_1b shapes)
  fp16         the tiny config in fp16 with dynamic loss scaling (fp16 training had never run)
  sync         the tiny config under train.sync_debug=warn: host syncs inside the training steps, counted
  pytest_gpu   the tests marked gpu (kernels compiled for CUDA at full size)

Training runs read byte-level shards made from this repository's text (no download) and save no checkpoint
(checkpoint.at_end=false). Attention kernels launch their first-choice configs (MEGALM_ATTENTION_AUTOTUNE=0):
one compile per shape instead of one per autotuning candidate. Writes, rewritten after every part so that a
timeout leaves what was measured: DIR/results.json and DIR/summary.md, plus each part's log DIR/<part>.txt.

MFU convention: 6N + 12*L*H*Q*T FLOPs per token (PaLM, Megatron, torchtitan: causal attention counted in full);
the causal-exact count (attention halved) is reported beside it, against the datasheet and the measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2", "model.seq_len=64",
              "model.ffn_hidden=128", "train.micro_batch_size=2", "train.global_batch_size=2"]  # fmt: skip
# name -> seconds wanted on the GPU (the budget is shared out in this order)
PARTS = {"env": 20, "llama_fused": 110, "llama_eager": 80, "kernels": 90, "ops": 60, "fp16": 30, "sync": 30,
         "pytest_gpu": 60}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "gpu_out")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 8 minutes)")
    p.add_argument("--dry-run", action="store_true", help="every part at tiny sizes on CPU")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--llama-steps", type=int, default=30)
    return p.parse_args(argv)


def run_part(name: str, cmd: list[str], out: Path, timeout: float, env: dict | None = None) -> dict:
    """Run one part's command with a timeout, its output in out/<name>.txt; never raises."""
    t0 = time.monotonic()
    log = out / f"{name}.txt"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    return {"part": name, "status": status, "seconds": round(time.monotonic() - t0, 1), "log": log.name}


def tail(path: Path, n: int = 6) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-n:])


# ------------------------------------------------------------------------------------------------ the parts


def env_command(out: Path, dry_run: bool) -> list[str]:
    code = f"""
import json, platform, torch
info = {{"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}}
try:
    import triton; info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
import importlib.metadata
for name, dist in (("deepspeed", "deepspeed"), ("webdataset", "webdataset"), ("liger_kernel", "liger-kernel")):
    try:
        __import__(name)
        info[name] = importlib.metadata.version(dist)
    except Exception as e:
        info[name] = f"missing ({{type(e).__name__}}: {{e}})"
dev = "cuda" if torch.cuda.is_available() else "cpu"
n = 512 if {dry_run} or dev == "cpu" else 8192
a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
if dev == "cuda":
    import triton.testing
    info["gpu"] = torch.cuda.get_device_name()
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
else:
    import time
    t0 = time.perf_counter(); a @ b; ms = (time.perf_counter() - t0) * 1e3
info["matmul_n"], info["matmul_tflops"] = n, 2 * n**3 / ms / 1e9
print(json.dumps(info))
json.dump(info, open({str(out / "env.json")!r}, "w"), indent=1)
"""
    return [sys.executable, "-c", code]


def prepare_data(tmp: Path) -> Path:
    """Byte-level shards of this repository's text (about 1 MB, no download); returns the prepare output dir."""
    files = sorted(p for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".yaml") and ".venv" not in p.parts)
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(p.read_text(errors="replace") for p in files))
    out = tmp / "data"
    cmd = [sys.executable, "-m", "megalm", "prepare", "--input", str(corpus), "--tokenizer", "bytes", "--output",
           str(out), "--val-fraction", "0.1"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=120)
    return out


def train_command(config: str, data: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    base = [f"data.train={data / 'train'}", "data.val=null", "data.tokenizer=bytes", "train.resume=none",
            f"train.run_dir={run_dir}", "checkpoint.at_end=false", "log.tensorboard=false"]  # fmt: skip
    return [sys.executable, str(REPO / "launcher" / "pretrain.py"), "--config", config, *base, *overrides]


LLAMA_PATHS = {"fused": ["model.attention=flash", "model.kernels=triton"],
               "eager": ["model.attention=sdpa", "model.kernels=torch"]}  # fmt: skip


def llama_command(args, data: Path, tmp: Path, path: str) -> list[str]:
    steps = 4 if args.dry_run else args.llama_steps
    over = [*LLAMA_PATHS[path], f"train.max_steps={steps}", "train.log_interval=5", "optim.warmup_steps=5"]
    if args.dry_run:  # on CPU "flash" runs the kernels' torch reference
        over += [*TINY_LLAMA, "train.log_interval=1"]
    return train_command("configs/llama_1b.yaml", data, tmp / f"llama_{path}", over)


def tiny_command(args, data: Path, tmp: Path, name: str, extra: list[str]) -> list[str]:
    over = ["train.max_steps=" + ("6" if args.dry_run else "50"), "train.eval_interval=0", "train.log_interval=5"]
    return train_command("configs/tiny.yaml", data, tmp / name, over + extra)


def command_for(name: str, args, data: Path | None, tmp: Path, out: Path) -> tuple[list[str] | None, dict]:
    """(command, extra environment) of part `name`; None when it cannot run (no data)."""
    env = {"TRITON_INTERPRET": "0", "MEGALM_ATTENTION_AUTOTUNE": "0"}
    if name == "env":
        return env_command(out, args.dry_run), env
    if name == "kernels":
        extra = ["--device", "cpu", "--dry-run"] if args.dry_run else []
        return [sys.executable, str(REPO / "bench" / "kernels.py"), "--out", str(out / "kernels.json"), *extra], env
    if name == "ops":
        extra = ["--device", "cpu", "--dry-run", "--no-compile"] if args.dry_run else []
        return [sys.executable, str(REPO / "bench" / "ops.py"), "--out", str(out / "ops.json"), *extra], env
    if name == "pytest_gpu":
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/kernels",
                "tests/model"], env  # fmt: skip
    if data is None:
        return None, env
    if name.startswith("llama_"):
        return llama_command(args, data, tmp, name.split("_", 1)[1]), env
    if name == "fp16":  # CPU cannot train in fp16: the dry run checks the plumbing in bf16
        return tiny_command(args, data, tmp, name, ["precision.dtype=" + ("bf16" if args.dry_run else "fp16")]), env
    return tiny_command(args, data, tmp, name, ["train.sync_debug=warn", "train.log_interval=50"]), env


# ------------------------------------------------------------------------------------------------ summaries


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in rows if "loss" in r]


def mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def causal_ratio(overrides: list[str]) -> float:
    """Causal-exact FLOPs per token / the 6N + 12LHQT convention, for llama_1b with these overrides."""
    sys.path.insert(0, str(REPO))
    from megalm.config import load_config
    from megalm.model.transformer import param_count

    m = load_config(REPO / "configs" / "llama_1b.yaml", [o for o in overrides if o.startswith("model.")]).model
    n, attn = 6.0 * param_count(m)["matmul"], 12.0 * m.n_layer * m.n_head * m.head_dim * m.seq_len
    return (n + attn / 2) / (n + attn)


def llama_summary(args, tmp: Path, name: str, env_info: dict) -> dict:
    rows = metrics_rows(tmp / name)
    if not rows:
        return {}
    steady = rows[1:] or rows  # the first row includes Triton compilation and allocator warm-up
    tflops = mean(steady, "tflops")
    peak = env_info.get("matmul_tflops")
    ratio = causal_ratio(TINY_LLAMA if args.dry_run else [])
    return {"steps": rows[-1]["step"], "tokens_per_s": mean(steady, "tokens_per_s"), "tflops": tflops,
            "mfu_datasheet": mean(steady, "mfu"), "mfu_measured_peak": tflops / peak if tflops and peak else None,
            "tflops_causal_exact": tflops * ratio if tflops else None, "causal_ratio": ratio,
            "peak_mem_gib": max(r["mem_bytes"] for r in rows) / 2**30,
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}  # fmt: skip


def summarize(name: str, args, out: Path, tmp: Path, results: dict) -> dict:
    """Figures of a finished part, read from what it wrote."""
    env_info = results["parts"].get("env", {}).get("figures", {})
    if name == "env" and (out / "env.json").is_file():
        return json.loads((out / "env.json").read_text())
    if name.startswith("llama_"):
        return llama_summary(args, tmp, name, env_info)
    if name == "kernels" and (out / "kernels.json").is_file():
        k = json.loads((out / "kernels.json").read_text())
        return {"targets": k.get("targets"), "matmul_tflops": k.get("matmul_peak", {}).get("tflops")}
    if name == "ops" and (out / "ops.json").is_file():
        ops = json.loads((out / "ops.json").read_text())["ops"]
        ratio = lambda r: r.get("megalm_time_ratio", r.get("error"))  # megalm's fwd+bwd time / this contender's
        return {op: {r["contender"]: ratio(r) for r in rows} for op, rows in ops.items()}
    if name == "fp16":
        rows = metrics_rows(tmp / name)
        keys = ("step", "loss", "loss_scale", "skipped_steps")
        return {"first": {k: rows[0].get(k) for k in keys}, "last": {k: rows[-1].get(k) for k in keys}} if rows else {}
    if name == "sync":
        text = (out / "sync.txt").read_text(errors="replace") if (out / "sync.txt").is_file() else ""
        return {"sync_warnings": len(re.findall(r"called a synchronizing CUDA operation", text))}
    if name == "pytest_gpu":
        return {"last_line": tail(out / "pytest_gpu.txt", 1)}
    return {}


def write_results(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = [f"# megalm GPU check ({'dry run on CPU' if results['dry_run'] else 'GPU'}), {results['date']}", "",
             "| part | status | seconds | figures |", "|---|---|---:|---|"]  # fmt: skip
    for name, row in results["parts"].items():
        figures = json.dumps(row.get("figures", {}), default=str)[:600]
        lines.append(f"| {name} | {row['status']} | {row['seconds']} | {figures} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def timeout_for(name: str, args, deadline: float) -> float:
    """What part `name` may take: what it wants, less what the parts after it need to start at all (15 s each)."""
    later = list(PARTS)[list(PARTS).index(name) + 1 :]
    reserve = 15.0 * sum(1 for n in later if n in args.parts)
    want = 240.0 if args.dry_run else PARTS[name]
    return max(5.0, min(want, deadline - time.monotonic() - reserve))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    results = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "budget_s": args.budget, "parts": {}}  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="megalm-gpu-check-"))
    try:
        data = prepare_data(tmp)
    except (subprocess.SubprocessError, OSError) as e:
        data, results["data_error"] = None, f"{type(e).__name__}: {e}"
    for name in args.parts:
        cmd, env = command_for(name, args, data, tmp, args.out)
        if cmd is None:
            row = {"part": name, "status": "skipped: no data (see data_error)", "seconds": 0}
        else:
            row = run_part(name, cmd, args.out, timeout_for(name, args, deadline), env)
            row["figures"] = summarize(name, args, args.out, tmp, results)
        results["parts"][name] = row
        write_results(args.out, results)
        print(f"{name}: {row['status']} in {row['seconds']} s: {json.dumps(row.get('figures', {}), default=str)[:300]}",
              flush=True)  # fmt: skip
    failed = [n for n, r in results["parts"].items() if r["status"] != "ok"]
    print(f"gpu_check: {len(results['parts']) - len(failed)} of {len(results['parts'])} parts ok; see {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
