"""Soak test of the fused executor: the command line is dualfuse/cli/soak.py, the logic dualfuse/soak.py.

    python benchmarks/soak.py --model clip-vit-b-32 --calls 10000 --out benchmarks/results/soak
    python benchmarks/soak.py --device cpu        # clip-tiny under the Triton interpreter, small shapes
"""
import sys

from dualfuse.cli.soak import main

if __name__ == "__main__":
    sys.exit(main())
