"""Per-step cost of the non-finite guard (megalm.training.health.NonFiniteGuard.observe), side by side.

A small GPT (default: 4 layers, d_model 256, 4 heads, seq_len 256, batch 4; torch AdamW, eager, fp32) trains
`--steps` steps per round; rounds alternate between observing every step and not, `--rounds` times. Reported: the
median step time of each, their ratio, and the median cost of one observe() call timed alone. The guard adds
device operations only (isfinite, where): on a GPU they are queued behind the step and never wait for it.

    python bench/nonfinite_guard.py [--steps 20] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from megalm.config import ModelConfig  # noqa: E402
from megalm.model.transformer import GPT  # noqa: E402
from megalm.training.health import NonFiniteGuard  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt2", n_layer=args.layers, n_head=4, d_model=args.d_model, vocab_size=512,
                      seq_len=args.seq_len)  # fmt: skip
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 512, (args.batch, args.seq_len + 1), device=device)
    guard = NonFiniteGuard(device)
    step_no = 0

    def step(observe: bool) -> None:
        nonlocal step_no
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a device tensor, as global_grad_norm's
        opt.step()
        step_no += 1
        if observe:
            guard.observe(step_no, loss.detach().reshape(1), norm)

    times: dict[str, list[float]] = {"off": [], "on": []}
    step(True)  # warm-up
    for r in range(args.rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(mode == "on")
            sync(device)
            times[mode].append((time.perf_counter() - t0) / args.steps)
    guard.check()  # everything was finite
    loss, norm = torch.ones(1, device=device), torch.ones((), device=device)
    calls = []
    for _ in range(200):
        sync(device)
        t0 = time.perf_counter()
        guard.observe(1, loss, norm)
        sync(device)
        calls.append(time.perf_counter() - t0)
    return {"step_off_s": statistics.median(times["off"]), "step_on_s": statistics.median(times["on"]),
            "observe_s": statistics.median(calls), "rounds": args.rounds, "steps": args.steps,
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    res = run(args)
    print(f"GPT {res['params'] / 1e6:.1f}M parameters, {args.device}, batch {args.batch} x {args.seq_len}; medians "
          f"of {res['rounds']} rounds of {res['steps']} steps")  # fmt: skip
    print(f"step without the guard {res['step_off_s'] * 1e3:.2f} ms, with it {res['step_on_s'] * 1e3:.2f} ms "
          f"(ratio {res['step_on_s'] / res['step_off_s']:.4f}); one observe() alone {res['observe_s'] * 1e6:.1f} us "
          f"({res['observe_s'] / res['step_off_s']:.3%} of a step)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
