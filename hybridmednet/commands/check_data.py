"""`hybridmednet check-data [--config FILE] [SECTION.key=value ...]`: scan a dataset before training on it.

Exit status 0: all good; 1: missing or unreadable files, or patients in two splits; 2: a config or
labels-file mistake (one line on stderr).
"""

from __future__ import annotations

import logging
import os

from hybridmednet.commands import add_config, config_from, parser, run
from hybridmednet.data.check import report, scan_files
from hybridmednet.data.datasets import build_index
from hybridmednet.data.splits import patient_leaks

PROBLEMS_FOUND = 1


class _Collect(logging.Handler):
    """The data layer's warnings, gathered for the report instead of printed as they come."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(argv: list[str] | None = None) -> int:
    p = parser('check-data', 'Scan a dataset: files, labels and patients per split.')
    add_config(p)
    p.add_argument('--no-decode', action='store_true', help='only check that files exist (fast)')
    p.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)

    def body() -> int:
        collect = _Collect()
        logger = logging.getLogger('hybridmednet.data')
        logger.addHandler(collect)
        try:
            index = build_index(config_from(args))
        finally:
            logger.removeHandler(collect)
        missing, corrupt = scan_files(list(index.records['path']), not args.no_decode, args.workers)
        leaks = patient_leaks(index.records['patient_id'], index.records['split'])
        print(report(index, leaks, missing, corrupt, collect.messages))
        return PROBLEMS_FOUND if missing or corrupt or leaks else 0

    return run('check-data', body)
