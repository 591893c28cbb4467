"""Score images: `python predict.py --image_path FILE_OR_DIR --model_path ... [--visualize] [--save_dir DIR]`.

Thin wrapper; the work is in hybridmednet.evaluation.predict (also `hybridmednet predict`).
"""
import sys

from hybridmednet.evaluation.predict import main

if __name__ == '__main__':
    sys.exit(main())
