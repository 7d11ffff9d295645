"""`python -m bench`: run the benchmark harness (bench/harness.py) from the repository root."""
import sys

from bench.harness import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
