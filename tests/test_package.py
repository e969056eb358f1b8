"""The package as a whole: importing it changes no process-wide state, and it documents itself."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "scalesearch_compile"


def test_import_changes_no_process_wide_state():
    """Environment variables, the levels and handlers of other libraries' loggers, warning filters and torch's
    global flags are the same before and after ``import scalesearch_compile`` (its dependencies imported first,
    so that only the package's own doing is compared)."""
    script = textwrap.dedent(
        """
        import logging, os, sys, warnings
        import torch, torchao.quantization, torchao.prototype.mx_formats.nvfp4_tensor, tqdm, transformers

        def state():
            loggers = {name: (logger.level, tuple(logger.handlers), logger.propagate, logger.disabled)
                       for name, logger in logging.root.manager.loggerDict.items()
                       if isinstance(logger, logging.Logger) and not name.startswith("scalesearch_compile")}
            flags = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32, torch.are_deterministic_algorithms_enabled(),
                     torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads(),
                     torch._C._get_flush_denormal() if hasattr(torch._C, "_get_flush_denormal") else None)
            return (dict(os.environ), loggers, logging.root.level, tuple(logging.root.handlers),
                    list(warnings.filters), flags, list(sys.path))

        before = state()
        import scalesearch_compile
        after = state()
        for name, old, new in zip(("environ", "loggers", "root level", "root handlers", "warnings", "torch flags",
                                   "sys.path"), before, after):
            if old != new:
                if isinstance(old, dict):
                    changed = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
                    print("CHANGED", name, changed)
                else:
                    print("CHANGED", name, old, new)
        print("done")
        """
    )
    # without the variable the test setup sets, so that setting it would show
    env = {key: value for key, value in os.environ.items() if key != "TORCHAO_FORCE_SKIP_LOADING_SO_FILES"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("done") and "CHANGED" not in run.stdout, run.stdout


def test_docstrings_cite_no_file_outside_the_repository():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for outside in ("FACTS.md", "DESIGN.md", "../shared"):
            assert outside not in text, f"{path.relative_to(PACKAGE.parent)} cites {outside}"


def test_example_helpers_are_not_installed_with_the_package():
    """Sentences, timing and tables for the scripts live in scalesearch_demo.py beside the package."""
    assert importlib.util.find_spec("scalesearch_compile.demo") is None
    assert importlib.util.find_spec("scalesearch_demo") is not None  # on the tests' path (pyproject pythonpath)
