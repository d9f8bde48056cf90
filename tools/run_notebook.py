"""Execute docs/walkthrough.ipynb top to bottom in a fresh python3 kernel and save it with its outputs, so its
pictures always come from the current code.

    python tools/run_notebook.py                  # its saved settings (under 10 minutes); saved in place
    python tools/run_notebook.py --tiny --out /tmp/tiny.ipynb   # LMD_NOTEBOOK_TINY=1: seconds; numbers mean nothing

Prints a line per cell; an error cell stops the run with a one-line message and exit status 2, nothing saved. The
kernel runs in the notebook's folder. Needs nbclient, nbformat, ipykernel (requirements.txt); Jupyter to open it."""

import argparse
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable as `python tools/run_notebook.py` from anywhere

from util.cli import ArgumentParser, UserError, run_cli  # noqa: E402

NOTEBOOK = os.path.join(ROOT, "docs", "walkthrough.ipynb")
TINY_VARIABLE = "LMD_NOTEBOOK_TINY"   # read by the notebook's settings cell
DEFAULTS = dict(notebook=NOTEBOOK, out=None, tiny=False, cell_timeout=600, kernel="python3")


def build_parser():
    parser = ArgumentParser(description="Re-execute the walkthrough notebook and save its outputs.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--notebook", default=DEFAULTS["notebook"], help="the notebook to execute")
    parser.add_argument("--out", default=DEFAULTS["out"], help="where to save the executed notebook (default: in "
                        "place; with --tiny an --out is required, so tiny outputs never replace the saved ones)")
    parser.add_argument("--tiny", action="store_true", help=f"set {TINY_VARIABLE}=1: the test's tiny settings")
    parser.add_argument("--cell-timeout", type=int, default=DEFAULTS["cell_timeout"], help="seconds per cell")
    parser.add_argument("--kernel", default=DEFAULTS["kernel"], help="the Jupyter kernel to run it in")
    return parser


def execute(path, tiny=False, cell_timeout=600, kernel="python3", progress=print):
    """Run the notebook at `path` in a fresh kernel -> (the executed notebook, seconds); an error cell: UserError."""
    import nbformat
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    if not os.path.isfile(path):
        raise UserError(f"notebook {path!r} does not exist; pass --notebook PATH")
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    started, cell_started = time.time(), {}

    def on_start(cell, cell_index):
        cell_started[cell_index] = time.time()

    def on_executed(cell, cell_index, execute_reply):
        number = code_cells.index(cell) + 1
        first = next((line for line in cell.source.splitlines() if line.strip() and not line.startswith("#")), "")
        progress(f"cell {number}/{len(code_cells)} done in {time.time() - cell_started[cell_index]:5.1f} s "
                 f"(total {time.time() - started:5.0f} s): {first[:70]}")

    # The settings cell reads the tiny switch from the kernel's environment. TQDM_DISABLE turns off the bars that do
    # not set `disable` themselves (the project's do: collapse_progress keeps their last state).
    environment = dict(os.environ, **{TINY_VARIABLE: "1" if tiny else "0", "TQDM_DISABLE": "1"})
    client = NotebookClient(notebook, timeout=cell_timeout, kernel_name=kernel, allow_errors=False,
                            resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}},
                            on_cell_start=on_start, on_cell_executed=on_executed)
    try:
        client.execute(env=environment)   # a fresh kernel, shut down at the end whatever happens
    except NoSuchKernel:
        raise UserError(f"no Jupyter kernel named {kernel!r}; pip install -r requirements.txt (ipykernel "
                        "provides python3)") from None
    except CellExecutionError as error:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))   # IPython colours its tracebacks
        lines = [line for line in text.strip().splitlines() if line.strip()]
        raise UserError(f"a cell of {path} failed: {lines[-1] if lines else error}") from None
    return collapse_progress(notebook), time.time() - started


def collapse_progress(notebook):
    """Merge each cell's consecutive outputs on the same stream and keep of every line what a terminal shows: the
    text after its last carriage return. A progress bar's hundred updates become its final state."""
    for cell in notebook.cells:
        merged = []
        for output in cell.get("outputs", []):
            if merged and output.output_type == "stream" and merged[-1].output_type == "stream" \
                    and merged[-1].name == output.name:
                merged[-1].text += output.text
            else:
                merged.append(output)
        for output in merged:
            if output.output_type == "stream":
                output.text = "\n".join(line.rstrip("\r").split("\r")[-1] for line in output.text.split("\n"))
        if "outputs" in cell:
            cell.outputs = merged
    return notebook


def image_outputs(notebook):
    """How many image outputs (PNG) the notebook's code cells hold."""
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.get("outputs", []))


def main(argv=None):
    flags = build_parser().parse_args(argv)
    if flags.tiny and not flags.out:
        raise UserError("--tiny outputs must not replace the saved ones: add --out PATH")
    import nbformat
    out = flags.out or flags.notebook
    print(f"executing {flags.notebook} ({'tiny' if flags.tiny else 'saved'} settings) ...", flush=True)
    notebook, seconds = execute(flags.notebook, flags.tiny, flags.cell_timeout, flags.kernel,
                                progress=lambda line: print(line, flush=True))
    nbformat.write(notebook, out)
    print(f"done in {seconds / 60:.1f} minutes, no error cell, {image_outputs(notebook)} image outputs -> {out}")


if __name__ == "__main__":
    run_cli(main)
