"""Prototype: an implicit (log-ratio) LoRA reward trained like the shipped one, then its swap test."""
import json
import logging
import sys
import time

import torch

from nabla_lc.models import load_embedded
from nabla_lc.rewards import ImplicitLoRAReward
from nabla_lc.rewards.train import read_records, train_reward

logging.basicConfig(level=logging.INFO)
torch.set_num_threads(1)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else None
model, tok = load_embedded()
records = read_records("/tmp/dr/records.jsonl")
reward = ImplicitLoRAReward(model, tok, rank=8, target_modules=("q_proj", "v_proj"))
t = time.perf_counter()
reward, report = train_reward(model, tok, records, reward=reward, lr=float(sys.argv[2]), batch_size=int(sys.argv[3]), seed=0, heldout=0.2, max_steps=steps, progress=True)
print(json.dumps({"train_s": round(time.perf_counter() - t, 1), **report.__dict__}), flush=True)
reward.save("/tmp/imp/implicit.safetensors")
