"""torchrun (`python -m torch.distributed.run`) without the launcher's own traceback when a worker
stops with an error: the worker has printed its one-line message already.

    python -m utils.launch [torchrun options] -m utils.train [training flags]
"""
import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

if __name__ == "__main__":
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        main()
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode != 1:  # 1: a reported error; anything else (a signal...) is news
            print(f"error: process {rank} exited with code {failure.exitcode}", file=sys.stderr)
        code = failure.exitcode
        sys.exit(code if 0 < code < 256 else 128 - code if code < 0 else 1)  # -9 -> 137, as bash
