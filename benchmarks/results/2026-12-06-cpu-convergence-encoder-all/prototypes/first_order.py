"""First-order reference on the encoder problem: exact gradients on the same batches (16 examples), SGD or Adam.

Prints the held-out accuracy every 5 steps up to 100 steps and the first step at which the 3-point running mean
reaches 0.632 (tuned MeZO's final accuracy on this problem). Not a zeroth-order method: a calibration of how far
the problem's target is for a gradient method (one backward per step, which the ZO budget does not allow).

usage: python first_order.py {all,cls} {sgd,adam} LR SEED
"""
import sys

import torch

torch.set_num_threads(1)
from zo_optim.bench.encoder import encoder  # noqa: E402

which, opt_name, lr, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
inst = encoder("full", seed)
ps = inst.params[18:] if which == "cls" else inst.params
opt = (torch.optim.Adam if opt_name == "adam" else torch.optim.SGD)(ps, lr=lr)
steps, accs = [0], [inst.evaluate()]
for step in range(1, 101):
    clo = inst.closure_for_step()
    opt.zero_grad()
    clo().mean().backward()
    opt.step()
    if step % 5 == 0:
        steps.append(step)
        accs.append(inst.evaluate())
smooth = [sum(accs[max(0, i - 2):i + 1]) / len(accs[max(0, i - 2):i + 1]) for i in range(len(accs))]
hit = next((s for s, v in zip(steps, smooth, strict=True) if v >= 0.632), None)
curve = " ".join(f"{s}:{a:.3f}" for s, a in zip(steps, accs, strict=True))
print(which, opt_name, lr, seed, "steps_to_0.632", hit, curve, flush=True)
