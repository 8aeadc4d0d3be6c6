"""What the paper compares RewardMap with, or researchers ablate: other advantage estimators (advantages.py),
DAPO's dynamic sampling (dynamic_sampling.py) and a supervised cold start before RL (coldstart.py)."""
