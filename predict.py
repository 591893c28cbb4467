"""`python predict.py --image_path FILE_OR_DIR --model_path ... [--visualize]`: the same as `hybridmednet predict`."""

import sys

from hybridmednet.commands.predict import main

if __name__ == '__main__':
    sys.exit(main())
