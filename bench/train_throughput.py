"""Tokens/s of vloop's LoRA training loop against a plain transformers ``Trainer`` with PEFT,
on the same data, model and LoRA config, in the same run; and peak memory of each.

Both train the tiny Qwen3-VL (or ``--model DIR``) for the same number of steps and batch size on
the same synthetic (image, question, answer) samples, batches built by the same
``vloop.vlm.model.encode`` (answer-masked labels), so the difference is the loop itself.
Goal (issue #6): vloop / Trainer >= 1.0x.

    python bench/train_throughput.py            # 60 steps of 16
    python bench/train_throughput.py --quick    # 20 steps of 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
from training.lora import LoraTrainConfig, add_lora
from vloop.vlm.model import encode, load_model
from vloop.sim.synth import World

which, model_dir, steps, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = LoraTrainConfig(steps=steps, batch_size=bs, log_every=10**9)
samples = World(7).samples(256)
torch.manual_seed(0)
lm = load_model(model_dir)
model = add_lora(lm.model, cfg)
tokens = 0
t0 = time.perf_counter()
if which == "vloop":
    from vloop.learn.sft import run_sft
    r = run_sft(model, lm.processor, samples, steps=steps, batch_size=bs, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                seed=0, log_every=10**9, log=lambda s: None)
    tokens, seconds = r.tokens, r.seconds
else:
    from transformers import Trainer, TrainingArguments

    def collate(batch):
        global tokens
        enc = encode(lm.processor, [s.image for s in batch], [s.question for s in batch], [s.answer for s in batch])
        tokens += int(enc["attention_mask"].sum())
        return dict(enc)

    args = TrainingArguments(output_dir=sys.argv[5], per_device_train_batch_size=bs, max_steps=steps,
                             learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine",
                             max_grad_norm=1.0, logging_steps=10**9, save_strategy="no", report_to=[],
                             remove_unused_columns=False, dataloader_num_workers=0, seed=0, use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collate)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
print(json.dumps({"tokens": tokens, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Qwen3-VL directory (default: a fresh tiny one)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps, bs = (20, 8) if args.quick else (args.steps, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if not model:
            from vloop.sim.tiny import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "tiny", seed=0))
        res = {}
        for which in ("trainer", "vloop", "trainer", "vloop"):  # interleaved: machine noise hits both
            out = subprocess.run([sys.executable, "-c", CHILD, which, model, str(steps), str(bs), tmp],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{which} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            best = res.get(which)
            if best is None or r["tokens"] / r["seconds"] > best["tokens"] / best["seconds"]:
                res[which] = r
            print(f"{which:8s} {r['tokens'] / r['seconds']:8.0f} tokens/s  {r['seconds']:6.1f} s  "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    v, t = res["vloop"], res["trainer"]
    ratio = (v["tokens"] / v["seconds"]) / (t["tokens"] / t["seconds"])
    print(f"RESULT steps={steps} batch={bs} vloop_tokens_s={v['tokens'] / v['seconds']:.0f} "
          f"trainer_tokens_s={t['tokens'] / t['seconds']:.0f} ratio={ratio:.2f} goal_met={ratio >= 1.0} "
          f"vloop_peak_mb={v['peak_rss_mb']:.0f} trainer_peak_mb={t['peak_rss_mb']:.0f}")


if __name__ == "__main__":
    main()
