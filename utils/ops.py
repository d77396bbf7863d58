"""`python -m utils.ops`: the operation counter, which lives in utils/deploy/ops.py."""
from utils.deploy.ops import *  # noqa: F401,F403
from utils.deploy.ops import __all__, main

if __name__ == "__main__":
    main()
