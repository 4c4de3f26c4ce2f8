"""Loaded at start-up by the Python processes the tests spawn (conftest puts this folder on PYTHONPATH): under
TRITON_INTERPRET=1 they get the same interpreter speed-up as the test process (tests/interpreter_speed.py)."""
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import interpreter_speed

        interpreter_speed.install()
    finally:
        del sys.path[0]
