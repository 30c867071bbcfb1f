"""Parsing Python source safely from several threads at once.

CPython 3.11 keeps the AST constructor's recursion counter per interpreter, not per thread: two
threads in ``ast.parse`` at once (a garbage collection in one lets the other run) fail with
"SystemError: AST constructor recursion depth mismatch" or a spurious RecursionError (cpython
gh-106905). The loop validates K candidates in threads, so every parse takes turns here.
``compile()`` to bytecode builds no Python AST objects and needs no lock.
"""

from __future__ import annotations

import ast
import threading

_AST_LOCK = threading.Lock()


def parse_python(source: str, path: str = "<unknown>") -> ast.Module:
    with _AST_LOCK:
        return ast.parse(source, path)
