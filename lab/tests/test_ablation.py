"""lab/ablation.py: the table of the four schedulers, mean ± std over seeds (moved here from tests/test_pictures.py
with the ablation itself)."""

from lab import ablation


def test_ablation_table_from_results():
    results = [dict(scheduler="constant", seed=1, held_out_loss=0.91234, knn=0.80, knn_scratch=0.70, linprobe=0.93,
                    linprobe_scratch=0.92, minutes=1.5, steps_per_second=12.345),
               dict(scheduler="constant", seed=2, held_out_loss=0.90, knn=0.84, knn_scratch=0.66, linprobe=0.95,
                    linprobe_scratch=0.94, minutes=1.5, steps_per_second=12.345),
               dict(scheduler="cosine", seed=1, held_out_loss=0.88, minutes=2.0, steps_per_second=9.0)]
    table = ablation.markdown_table(results).splitlines()
    assert table[0].startswith("| scheduler | seeds | held-out loss @0.75 | kNN top-1 | kNN, random init |")
    assert table[2] == ("| constant | 2 | 0.9062 ± 0.0087 | 0.820 ± 0.028 | 0.680 ± 0.028 | 0.940 ± 0.014 | "
                        "0.930 ± 0.014 | 1.50 ± 0.00 | 12.35 ± 0.00 |")
    assert table[3] == "| cosine | 1 | 0.8800 | n/a | n/a | n/a | n/a | 2.00 | 9.00 |"


def test_the_report_gives_the_command_that_made_it():
    results = [dict(scheduler="cosine", seed=0, held_out_loss=0.88, minutes=2.0, steps_per_second=9.0)]
    text = ablation.report(results, ["--out", "runs/a", "--", "--dataset", "digits"], 90.0)
    assert "Command: `python -m lab.ablation --out runs/a -- --dataset digits`" in text
    assert "| cosine | 1 | 0.8800 |" in text and "the whole ablation took 1.5 min" in text
