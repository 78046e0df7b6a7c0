#!/usr/bin/env python3
"""Loss curve of a train_mtp.py run: plot_loss.py RUN/log.jsonl OUT.png"""
import json, math, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train: next token", lw=1.2)
ax.plot([r["step"] for r in recs], [r["mtp_loss"] for r in recs], label="train: MTP head (token after next)", lw=1.2)
v = [r for r in recs if "val_loss" in r]
if v:
    ax.plot([r["step"] for r in v], [r["val_loss"] for r in v], "o-", label="held-out: next token", ms=4)
    ax.plot([r["step"] for r in v], [r["val_mtp_loss"] for r in v], "s-", label="held-out: MTP head", ms=4)
ax.set_xlabel("step (8 x 256 tokens)")
ax.set_ylabel("cross-entropy (nats/token)")
ax.set_ylim(0, max(r["loss"] for r in recs[1:]) + 0.5 if len(recs) > 1 else 9)
ax.grid(alpha=0.3)
ax.legend()
ax.set_title("mtp-gen default model: Qwen3.5 34.6M + MTP head, Python stdlib")
fig.tight_layout()
fig.savefig(sys.argv[2])
print("wrote", sys.argv[2])
