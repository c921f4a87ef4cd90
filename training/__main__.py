import sys

sys.exit("python -m training: the LoRA trainer is not built yet (see the retraining issue)")
