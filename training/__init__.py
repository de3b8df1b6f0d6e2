"""Long-tailed data, networks, losses, BNS (stage 1) and IP-DPP (stage 2) training, evaluation."""
