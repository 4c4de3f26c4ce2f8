"""pytest plugin: records which of dualfuse's Triton kernels the tests launch through the interpreter, and fails a
run that should launch every kernel but left one out.

A kernel is a `@triton.jit` function that dualfuse's own source launches (`name[grid](...)`); the `@triton.jit`
helpers those kernels call are not launched on their own and are not counted. The check runs
- on the default selection (`pytest` with no paths, no `-k`, the default `-m "not slow"` or `-m ""`), and
- wherever `--check-kernel-launches` is given (e.g. on a list of test files),
in both cases only under TRITON_INTERPRET=1 (the launches are recorded in the interpreter). Works with
pytest-xdist: each worker sends its launches to the controller."""
import ast
import importlib
import os
from pathlib import Path

import pytest

OPTION = "--check-kernel-launches"
WORKER_KEY = "dualfuse_kernel_launches"

launched: set[str] = set()
missing: list[str] = []
checked: list[bool] = []  # non-empty once the check has run


def kernel_name(fn) -> str:
    """module.function of a @triton.jit object (unwrapping autotuners and the like) or of a plain function."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return f"{fn.__module__}.{fn.__qualname__}"


def package_kernels() -> set[str]:
    """Every @triton.jit function dualfuse's source launches: a call of the form `name[...](...)` where `name` is a
    @triton.jit object of that module."""
    from triton.runtime.jit import KernelInterface

    import dualfuse
    root = Path(dualfuse.__file__).parent
    kernels = set()
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        names = {node.func.value.id for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                 and isinstance(node.func.value, ast.Name)}
        if not names:
            continue
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        kernels |= {kernel_name(obj) for obj in (getattr(module, n, None) for n in names)
                    if isinstance(obj, KernelInterface)}
    return kernels


def pytest_addoption(parser):
    parser.addoption(OPTION, action="store_true",
                     help="fail unless every Triton kernel of dualfuse was launched (under TRITON_INTERPRET=1)")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config):
    if not interpreting():
        return
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            launched.add(kernel_name(self))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    config.add_cleanup(lambda: setattr(InterpretedFunction, "run", original))


def wanted(config) -> bool:
    """Whether this run should launch every kernel."""
    if not interpreting() or hasattr(config, "workerinput") or config.option.collectonly:
        return False
    if config.getoption(OPTION):
        return True
    opt = config.option
    return (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not opt.keyword
            and opt.markexpr in ("not slow", "") and not opt.deselect and not getattr(opt, "lf", False)
            and not getattr(opt, "failedfirst", False))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist controller: a worker's launches."""
    launched.update(getattr(node, "workeroutput", {}).get(WORKER_KEY, ()))


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if hasattr(config, "workeroutput"):
        config.workeroutput[WORKER_KEY] = sorted(launched)
        return
    if not wanted(config) or exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        return
    checked.append(True)
    kernels = package_kernels()
    if not kernels:
        missing.append("(no kernel launch found in dualfuse's source: the check itself is broken)")
    missing.extend(sorted(kernels - launched))
    if missing:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not checked:
        return
    if missing:
        terminalreporter.section("kernels never launched", red=True)
        for name in missing:
            terminalreporter.write_line(f"FAILED: {name} was never launched by the tests that ran")
    else:
        ours = sorted(k for k in launched if k.startswith("dualfuse."))
        terminalreporter.write_line(f"every Triton kernel of dualfuse was launched ({len(ours)}): {', '.join(ours)}")
