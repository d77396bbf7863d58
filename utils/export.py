"""`python -m utils.export` and `from utils.export import load_packed`: the deployable 1-bit
network, which lives in utils/deploy/export.py."""
from utils.deploy.export import *  # noqa: F401,F403
from utils.deploy.export import __all__, main

if __name__ == "__main__":
    main()
