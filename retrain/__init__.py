"""Active-learning selection, dataset building, TRL training and the evaluation gate."""
