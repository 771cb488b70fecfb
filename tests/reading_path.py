"""What a reader reads to follow one period of a training loop: the project functions it calls.

    python tests/reading_path.py --anchor train_stage.train_step -- train_stage.py --stage sft1 ...
    python tests/reading_path.py --anchor rl.sample_groups -- rl.py --stage rl-verifiable ...

Runs the command (a script of this repository and its arguments) under a profiler. One period is
from the anchor function's second call to its third (so the first period's one-off work is not
in it): everything one training step (or RL episode) does, its data included. Reported: the
project functions called in that period, each counted once with its whole source (docstring
included; a nested function or comprehension counts as part of its enclosing function), the lines
they add up to, the files they live in and the file switches in reading order (each function read
once, where it is first called; a switch is the next one living in another file). The run goes on
untraced after the period. Data loader workers are not traced: run with --num_workers=0."""
import argparse
import inspect
import linecache
import os
import runpy
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outer_code_key(code):
    """(file, qualified name) of the top-level function or method `code` belongs to."""
    return code.co_filename, code.co_qualname.split(".<locals>")[0]


def function_lines(path: str, qualname: str) -> int:
    """Source lines of `qualname` (a function, or a method "Class.name") in the module file `path`:
    the block of its `def` line, found after its class's `class` line."""
    lines = linecache.getlines(path)
    *classes, name = qualname.split(".")
    start = 0
    for depth, cls in enumerate(classes):
        start = next(i for i in range(start, len(lines)) if lines[i].startswith(tuple("    " * depth + f"class {cls}{c}" for c in "(:")))
    indent = "    " * len(classes)
    for i in range(start, len(lines)):
        if lines[i].startswith((f"{indent}def {name}(", f"{indent}async def {name}(")):
            return len(inspect.getblock(lines[i:]))
    raise LookupError(f"no def {qualname} in {path}")


class PeriodTracer:
    def __init__(self, anchor: str):
        self.module, self.func = anchor.rsplit(".", 1)
        self.anchor_calls = 0
        self.order = []                                  # (file, qualname) in first-call order
        self.seen = set()
        self.done = False

    def project_code(self, code) -> bool:
        path = code.co_filename                          # "<frozen abc>", "<string>" for generated code
        return path.endswith(".py") and os.path.dirname(os.path.abspath(path)) == ROOT

    def __call__(self, frame, event, arg):
        if event != "call" or self.done:
            return
        code = frame.f_code
        if not self.project_code(code):
            return
        module = os.path.splitext(os.path.basename(code.co_filename))[0]
        if module == self.module and code.co_qualname == self.func:
            self.anchor_calls += 1
            if self.anchor_calls == 3:
                self.done = True
                sys.setprofile(None)
                threading.setprofile(None)
                return
        if self.anchor_calls == 2:
            key = outer_code_key(code)
            if key not in self.seen:
                self.seen.add(key)
                self.order.append(key)

    def report(self) -> str:
        if not self.done:
            return f"the anchor {self.module}.{self.func} was called {self.anchor_calls} times (3 needed)"
        rows = [(os.path.basename(f), q, function_lines(f, q)) for f, q in self.order]
        files = [r[0] for r in rows]
        switches = sum(a != b for a, b in zip(files, files[1:]))
        per_file = {}
        for f, _, n in rows:
            per_file[f] = per_file.get(f, 0) + n
        out = [f"one period of {self.module}.{self.func}: {len(rows)} functions, {sum(r[2] for r in rows)} lines, "
               f"{len(per_file)} files, {switches} file switches in reading order"]
        out += [f"  {f:16s} {n:5d} lines" for f, n in sorted(per_file.items(), key=lambda kv: -kv[1])]
        out += ["reading order:"] + [f"  {f}:{q} ({n})" for f, q, n in rows]
        return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchor", required=True, help="module.function called once per period, e.g. train_stage.train_step")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py and its arguments")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command after --")
    tracer = PeriodTracer(args.anchor)
    script = os.path.join(ROOT, command[0])
    sys.argv = [script] + command[1:]
    sys.path.insert(0, ROOT)
    threading.setprofile(tracer)
    sys.setprofile(tracer)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    finally:
        sys.setprofile(None)
        print(tracer.report())


if __name__ == "__main__":
    main()
