"""The docs say what the code does: every command in README.md, docs/*.md and lab/docs/*.md parses with its own
script's parser (torchrun's flags with torchrun's; `python -m lab.X` with the lab module's), and docs/flags.md is
what tests/flag_reference.py writes today. Without the lab folder its commands are not parsed."""

import contextlib
import glob
import importlib
import io
import os
import re
import shlex

import pytest

import flag_reference
from support import ROOT

DOCS = ["README.md", *sorted(os.path.relpath(path, ROOT) for folder in ("docs", "lab/docs")
                             for path in glob.glob(os.path.join(ROOT, folder, "*.md")))]
HAS_LAB = os.path.isdir(os.path.join(ROOT, "lab"))
# A script that the docs name before it is written, with the reason. Empty: every script the docs run must exist.
NOT_YET_WRITTEN = {}
# Scripts that hand the flags they do not know to another script (after `--`): those must parse there.
PASSES_ON = {"-m lab.ablation": "-m lab.train"}


def shell_commands(text):
    """[(line number, argv)] for each command in a Markdown text: the lines of its fenced code blocks (continuation
    lines joined, comments dropped, bash arrays and variables set in the same block expanded) and its inline code
    spans that start with `python ` or `torchrun `."""
    commands = []
    for block in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.M | re.S):
        if block.group(1).strip() == "python":   # a Python listing, not commands
            continue
        first_line = text.count("\n", 0, block.start(2)) + 1
        scalars, arrays, logical = {}, {}, []
        for number, line in enumerate(block.group(2).split("\n"), first_line):
            if logical and logical[-1][1].endswith("\\"):
                logical[-1] = (logical[-1][0], logical[-1][1][:-1] + " " + line.strip())
            else:
                logical.append((number, line.strip()))
        for number, line in logical:
            array = re.match(r"^(\w+)=\((.*)\)\s*(#.*)?$", line)
            scalar = re.match(r"^(\w+)=(\S+)$", line)
            if array:
                arrays.setdefault(array.group(1), []).append(shlex.split(array.group(2)))
            elif scalar:
                scalars[scalar.group(1)] = scalar.group(2)
            elif line and not line.startswith("#"):
                commands += [(number, argv) for argv in expand(shlex.split(line, comments=True), scalars, arrays)]
    prose = re.sub(r"^```[^\n]*\n.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)
    for span in re.finditer(r"`([^`]+)`", prose):
        if span.group(1).startswith(("python ", "torchrun ")):
            commands.append((prose.count("\n", 0, span.start()) + 1, shlex.split(span.group(1).replace("\n", " "))))
    return commands


def expand(argv, scalars, arrays):
    """argv with "${NAME[@]}" replaced by each value the block gives the array NAME, and $NAME by its value (or by a
    placeholder when the block does not set it): one argv per combination."""
    def value(token):
        return re.sub(r"\$\{?(\w+)\}?", lambda m: scalars.get(m.group(1), "PLACEHOLDER"), token)

    results = [[]]
    for token in argv:
        whole = re.fullmatch(r"\$\{(\w+)\[@\]\}", token)
        choices = arrays.get(whole.group(1), [[]]) if whole else [[token]]
        results = [done + [value(t) for t in choice] for done in results for choice in choices]
    return results


def script_and_arguments(argv):
    """(script path, its arguments) of a `python X.py ...` command, ("-m lab.X", its arguments) of a lab module's,
    ("torchrun", its arguments) of a torchrun one that starts a script, or None for any other command."""
    while argv and ("=" in argv[0] and not argv[0].startswith("-") or argv[0] == "srun"):
        argv = argv[1:]                                     # VAR=value prefixes and srun
    if len(argv) >= 2 and argv[0] in ("python", "python3") and argv[1].endswith(".py"):
        return argv[1], argv[2:]
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m" and argv[2].startswith("lab."):
        return f"-m {argv[2]}", argv[3:]
    if argv and argv[0] == "torchrun" and any(token.endswith(".py") for token in argv):
        return "torchrun", argv[1:]
    return None


def parser_of(path):
    if path not in PARSERS:
        if path == "torchrun":
            from torch.distributed.run import get_args_parser
            PARSERS[path] = get_args_parser()
        elif path.startswith("-m "):
            PARSERS[path] = importlib.import_module(path[3:]).build_parser()
        else:
            PARSERS[path] = flag_reference.load_script(path).build_parser()
    return PARSERS[path]


PARSERS = {}


def command_error(path, arguments):
    """What is wrong with running the script `path` (or torchrun) with these arguments, in one line; None if they
    parse. torchrun's own flags go to torchrun's parser, the script's to the script's."""
    if path.startswith("-m lab.") and not HAS_LAB:
        return None   # the lab's commands, in a copy without the lab
    module_file = path[3:].replace(".", "/") + ".py" if path.startswith("-m ") else path
    if path != "torchrun" and not os.path.exists(os.path.join(ROOT, module_file)):
        return None if path in NOT_YET_WRITTEN else f"no such script {path}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if path in PASSES_ON:
                _, rest = parser_of(path).parse_known_args(arguments)
                return command_error(PASSES_ON[path], [a for a in rest if a != "--"])
            parsed = parser_of(path).parse_args(arguments)
    except SystemExit as exit_info:
        if exit_info.code == 0:   # --help
            return None
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else "exit without a message"
    if path == "torchrun":
        return command_error(parsed.training_script, parsed.training_script_args)
    return None


def invalid_commands(doc):
    """'doc:line: command -> error' for each command of a document that does not parse."""
    with open(os.path.join(ROOT, doc)) as file:
        text = file.read()
    failures = []
    for number, argv in shell_commands(text):
        found = script_and_arguments(argv)
        error = found and command_error(*found)
        if error:
            failures.append(f"{doc}:{number}: {shlex.join(argv)} -> {error}")
    return failures


def test_the_command_finder_reads_blocks_spans_continuations_and_arrays():
    text = """Intro `python train.py --steps 3` and `finetune.py --mode knn` (no python: not a command).

```bash
python train.py --dataset digits \\
    --steps 5      # a comment
pip install -r requirements.txt
RUN=/runs/a
if [ -f "$RUN/x" ]; then
    ARGS=(--resume "$RUN")
else
    ARGS=(--out "$RUN" --steps 7)
fi
srun torchrun --nproc_per_node=8 \\
    train.py "${ARGS[@]}"
```
A span across lines: `python tools/race.py --minutes 2
--out runs/race`.
"""
    commands = shell_commands(text)
    assert commands == [
        (4, ["python", "train.py", "--dataset", "digits", "--steps", "5"]),
        (6, ["pip", "install", "-r", "requirements.txt"]),
        (8, ["if", "[", "-f", "/runs/a/x", "];", "then"]),
        (10, ["else"]), (12, ["fi"]),
        (13, ["srun", "torchrun", "--nproc_per_node=8", "train.py", "--resume", "/runs/a"]),
        (13, ["srun", "torchrun", "--nproc_per_node=8", "train.py", "--out", "/runs/a", "--steps", "7"]),
        (1, ["python", "train.py", "--steps", "3"]),
        (16, ["python", "tools/race.py", "--minutes", "2", "--out", "runs/race"]),
    ]
    assert script_and_arguments(commands[5][1]) == ("torchrun", ["--nproc_per_node=8", "train.py", "--resume",
                                                                 "/runs/a"])
    assert script_and_arguments(commands[0][1]) == ("train.py", ["--dataset", "digits", "--steps", "5"])
    assert script_and_arguments(commands[1][1]) is None


def test_a_bad_command_is_caught():
    assert "--steps" in command_error("train.py", ["--steps", "many"])
    assert "--no-such-flag" in command_error("finetune.py", ["--checkpoint", "R", "--no-such-flag"])
    assert "--steps" in command_error("torchrun", ["--nproc_per_node=2", "train.py", "--steps", "many"])
    assert "--nproc" in command_error("torchrun", ["--nproc=2", "train.py"])                # torchrun's own flags
    assert command_error("no_such_script.py", []) == "no such script no_such_script.py"
    assert command_error("torchrun", ["--nproc_per_node=2", "train.py", "--scheduler", "cosine"]) is None
    if HAS_LAB:   # a lab module's own flags, and train.py's flags after the ablation's `--`
        assert "--out" in command_error("-m lab.race", ["--dataset", "digits", "--minutes", "2"])   # --out is required
        assert "--no-such-flag" in command_error("-m lab.ablation", ["--out", "x", "--", "--no-such-flag"])


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_in_the_docs_parses(doc):
    if doc.startswith("lab/") and not HAS_LAB:
        pytest.skip("the lab's pages, without the lab")
    if doc != "docs/forking.md" or not HAS_LAB:
        failures = invalid_commands(doc)
    else:   # its lab commands run once its example is saved in lab/: parsed with the example registered
        lab = importlib.import_module("lab")   # only where the lab is
        forked_objective = importlib.import_module("lab.tests.forked_objective")
        lab.register(forked_objective.OBJECTIVE)
        PARSERS.clear()
        try:
            failures = invalid_commands(doc)
        finally:
            lab.OBJECTIVES.pop(forked_objective.OBJECTIVE.name)
            PARSERS.clear()
    assert not failures, "\n".join(failures)


def test_the_readme_runs_the_main_scripts():
    """So that the test above cannot pass by finding no command at all."""
    with open(os.path.join(ROOT, "README.md")) as file:
        found = [script_and_arguments(argv) for _, argv in shell_commands(file.read())]
    scripts = {f[0] for f in found if f}
    assert {"train.py", "finetune.py", "torchrun"} <= scripts, scripts
    assert ("train.py", ["--scheduler", "cosine"]) in found and ("train.py", ["--dataset", "fashion-mnist"]) in found


def test_the_flag_reference_is_current():
    with open(flag_reference.FLAGS_MD) as file:
        written = file.read()
    assert written == flag_reference.render(), ("docs/flags.md is stale: run python tests/flag_reference.py")
