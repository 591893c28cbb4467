"""Evaluate a checkpoint: `python evaluate.py --model_path checkpoints/best_model.pth [--save_results]`.

Thin wrapper; the work is in hybridmednet.evaluation.evaluate (also `hybridmednet evaluate`).
"""
import sys

from hybridmednet.evaluation.evaluate import main

if __name__ == '__main__':
    sys.exit(main())
