"""What the paper compares RewardMap with, or researchers ablate: other advantage estimators (advantages.py),
DAPO's dynamic sampling (dynamic_sampling.py) and supervised fine-tuning before RL, the cold start the paper compares with (sft.py)."""
