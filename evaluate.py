"""`python evaluate.py --model_path checkpoints/best_model.pth [--save_results]`: as `hybridmednet evaluate`."""

import sys

from hybridmednet.commands.evaluate import main

if __name__ == '__main__':
    sys.exit(main())
