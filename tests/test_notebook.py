"""docs/walkthrough.ipynb: it runs top to bottom in a fresh python3 kernel on tiny settings with no error cell (and
without the Fashion-MNIST package), the saved copy holds the outputs of a full run on Fashion-MNIST within the time
it promises, and tools/run_notebook.py stops on an error cell."""

import importlib.util
import os
import re

import nbformat
import pytest

from support import ROOT

NOTEBOOK = os.path.join(ROOT, "docs", "walkthrough.ipynb")
MIN_IMAGES = 6   # the bar: at least 6 pictures saved in the notebook
MAX_MINUTES = 10  # the saved run's wall time, as its last cell prints it, stays under this


@pytest.fixture(scope="module")
def tool():
    """tools/run_notebook.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("run_notebook", os.path.join(ROOT, "tools", "run_notebook.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def printed(notebook):
    """Everything the code cells printed (stream outputs), as one string."""
    return "".join(output.get("text", "") for cell in code_cells(notebook) for output in cell.outputs
                   if output.output_type == "stream")


def test_saved_notebook_holds_a_full_run(tool):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cells = code_cells(notebook)
    # Executed top to bottom in one kernel, every cell once, none failed.
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    assert not [output for cell in cells for output in cell.outputs if output.output_type == "error"]
    assert tool.image_outputs(notebook) >= MIN_IMAGES
    # With its saved settings: the tiny ones must never replace the saved pictures.
    text = printed(notebook)
    assert "its saved settings" in text and "tiny test settings" not in text
    # On the clothes, probed beside the random init and the raw pixels, with the objective's progress bar.
    assert "fashion-mnist" in text and "T-shirt/top" in text
    assert all(words in text for words in ("kNN top-1", "random init", "raw pixels", "standard errors"))
    assert "lmd: 100%" in text and "pretraining:" not in text
    minutes = float(re.search(r"this notebook ran in ([0-9.]+) minutes", text).group(1))
    assert minutes < MAX_MINUTES


def test_runs_headless_on_tiny_settings(tool, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))   # the kernel inherits it: the tiny run writes under tmp_path
    notebook, _ = tool.execute(NOTEBOOK, tiny=True, cell_timeout=300)
    cells = code_cells(notebook)
    assert all(cell.execution_count for cell in cells)
    assert not [output for cell in cells for output in cell.outputs if output.output_type == "error"]
    assert tool.image_outputs(notebook) >= MIN_IMAGES
    assert "tiny test settings" in printed(notebook)          # LMD_NOTEBOOK_TINY reached the kernel
    assert "read from scikit-learn" in printed(notebook)       # the digits, not the Fashion-MNIST package
    assert os.listdir(tmp_path)                                # and its files went to the temporary folder


def test_an_error_cell_stops_the_run(tool, tmp_path):
    broken = tmp_path / "broken.ipynb"
    cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("1 / 0"),
             nbformat.v4.new_code_cell("print('never reached')")]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), str(broken))
    with pytest.raises(tool.UserError, match="ZeroDivisionError"):
        tool.execute(str(broken))


@pytest.mark.parametrize("argv, message", [
    (["--tiny"], "add --out PATH"),
    (["--notebook", "no/such.ipynb", "--out", "x.ipynb"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tool, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        tool.run_cli(lambda: tool.main(argv))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert message in stderr
