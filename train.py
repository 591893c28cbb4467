"""`python train.py [--config FILE] [--resume PATH] [SECTION.key=value ...]`: trains with configs/default_config.py."""

import sys

from configs.default_config import Config
from hybridmednet.commands.train import main

if __name__ == '__main__':
    sys.exit(main(sys.argv[1:], base=Config))
